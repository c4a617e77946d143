#!/usr/bin/env python3
"""A real OTLP/HTTP trace receiver for the tests, sharing no code with the mesh: it decodes
`POST /v1/traces` bodies (application/x-protobuf) with the official `opentelemetry-proto`
package from PyPI and writes one JSON line per span to OUT. `--status` answers every export
with that status (a refusing collector), `--delay` answers after that many seconds (a slow
one). Prints `listening HOST:PORT` once ready.

Usage: otlp_receiver.py --listen HOST:PORT --out FILE [--status 200] [--delay 0]"""

import argparse
import http.server
import json
import sys
import threading
import time

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--status", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            if args.delay:
                time.sleep(args.delay)
            if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
                return self.answer(404, b"")
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            lines = []
            for resource_spans in request.resource_spans:
                resource = {kv.key: value(kv.value) for kv in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        lines.append(json.dumps({
                            "service": resource.get("service.name"),
                            "scope": scope_spans.scope.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "name": span.name,
                            "kind": Span.SpanKind.Name(span.kind),
                            "start_ns": span.start_time_unix_nano,
                            "end_ns": span.end_time_unix_nano,
                            "status": span.status.code,
                            "attributes": {kv.key: value(kv.value) for kv in span.attributes},
                        }))
            if args.status == 200:
                with lock, open(args.out, "a") as out:
                    for line in lines:
                        out.write(line + "\n")
            self.answer(args.status, ExportTraceServiceResponse().SerializeToString())

        def answer(self, status, payload):
            self.send_response(status)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = http.server.ThreadingHTTPServer((host, int(port)), Handler)
    print(f"listening {host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
