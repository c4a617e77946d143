//! A real HTTP server for pod namespaces (hyper: HTTP/1.1 and h2c, gRPC framing with
//! trailers, protocol upgrades), whose answers say which pod served them and whose failures
//! and delays the tests control; and curl/wrk drivers run inside pod namespaces.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{body::Frame, service::service_fn, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::netns::Netns;

/// How the server answers, changeable while it runs.
#[derive(Clone, Debug, Default)]
pub struct Mode {
    /// Every `n`-th request (1st, n+1-th, ...) gets 503.
    pub fail_every: Option<u64>,
    /// Every request gets this status.
    pub status: Option<u16>,
    /// Each request is answered by a GET of this URL (from the pod, so through its node's
    /// proxy) that carries the request's trace headers, as an application that forwards
    /// them does; the answer is that call's status and body.
    pub forward_to: Option<String>,
}

/// Trace context headers an application forwards (W3C, B3) and `x-request-id`.
pub const TRACE_HEADERS: [&str; 9] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-request-id",
];

/// Counters of what the server saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Requests answered.
    pub requests: AtomicU64,
    /// Connections open now.
    pub open: AtomicUsize,
    /// Most connections open at once.
    pub max_open: AtomicUsize,
    /// Paths and `Host` of the requests, in order.
    pub log: Mutex<Vec<(String, String)>>,
    /// The `x-forwarded-client-cert` values of the requests, in order (empty: none).
    pub client_certs: Mutex<Vec<String>>,
    /// The trace headers ([`TRACE_HEADERS`]) of each request, in order.
    pub trace_headers: Mutex<Vec<Vec<(String, String)>>>,
}

/// An HTTP server in a pod namespace; stopped on drop.
pub struct WebServer {
    /// The pod name it reports as (`x-pod` header, and the body).
    pub name: String,
    /// Change to alter answers.
    pub mode: Arc<Mutex<Mode>>,
    /// What it saw.
    pub seen: Arc<Seen>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl WebServer {
    /// Serves on `0.0.0.0:port` inside `ns`, as `name`.
    pub fn start(ns: &Netns, port: u16, name: &str) -> Result<WebServer> {
        let listener = ns.run(move || {
            // An accept queue as deep as the proxy's (std's 128 overflows when a proxy opens
            // thousands of connections at once: the overflowing ones look connected to the
            // proxy yet never reach the server).
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], port)).into())?;
            socket.listen(4096)?;
            socket.set_nonblocking(true)?;
            Ok(std::net::TcpListener::from(socket))
        })?;
        let mode = Arc::new(Mutex::new(Mode::default()));
        let seen = Arc::new(Seen::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (m, s, n) = (mode.clone(), seen.clone(), name.to_string());
        // In the pod's namespace: a forwarding server calls out from the pod.
        let thread = ns.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                tokio::pin!(stopped);
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else { continue };
                            let (m, s, n) = (m.clone(), s.clone(), n.clone());
                            tokio::spawn(async move { connection(stream, m, s, n).await });
                        }
                    }
                }
            });
            Ok(())
        });
        Ok(WebServer {
            name: name.to_string(),
            mode,
            seen,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Sets the mode.
    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.seen.requests.load(Ordering::Relaxed)
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Open(Arc<Seen>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    mode: Arc<Mutex<Mode>>,
    seen: Arc<Seen>,
    name: String,
) {
    let now = seen.open.fetch_add(1, Ordering::AcqRel) + 1;
    seen.max_open.fetch_max(now, Ordering::AcqRel);
    let _open = Open(seen.clone());
    let service = service_fn(move |req| {
        let (mode, seen, name) = (mode.clone(), seen.clone(), name.clone());
        async move { Ok::<_, Infallible>(answer(req, &mode, &seen, &name).await) }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await;
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(
    mut req: Request<hyper::body::Incoming>,
    mode: &Mutex<Mode>,
    seen: &Seen,
    name: &str,
) -> Response<Body> {
    let n = seen.requests.fetch_add(1, Ordering::AcqRel) + 1;
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/".into(), |p| p.to_string());
    seen.log.lock().unwrap().push((path.clone(), host));
    let client_cert = req
        .headers()
        .get_all("x-forwarded-client-cert")
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect::<Vec<_>>()
        .join(" | ");
    seen.client_certs.lock().unwrap().push(client_cert);
    let trace: Vec<(String, String)> = TRACE_HEADERS
        .iter()
        .filter_map(|name| {
            let value = req.headers().get(*name)?.to_str().ok()?;
            Some((name.to_string(), value.to_string()))
        })
        .collect();
    seen.trace_headers.lock().unwrap().push(trace.clone());
    let query = |key: &str| {
        req.uri().query().and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_string)
        })
    };
    // `?grpc_status=X`: the gRPC status a gRPC answer ends with (any text, as a hostile
    // backend may send).
    let grpc_status = query("grpc_status").unwrap_or_else(|| "0".into());
    let delay = query("delay_ms").and_then(|v| v.parse::<u64>().ok());
    if let Some(ms) = delay {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mode = mode.lock().unwrap().clone();
    let version = format!("{:?}", req.version());
    let builder = |status: u16| {
        Response::builder()
            .status(status)
            .header("x-pod", name)
            .header("x-seen-version", version.clone())
            .header("x-seen-path", path.clone())
    };
    if path == "/bytes" {
        return builder(200)
            .body(crate::load::Endless::default().boxed())
            .unwrap();
    }
    if req.headers().contains_key("upgrade") {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on.await {
                let mut io = TokioIo::new(upgraded);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        return builder(101)
            .header("connection", "upgrade")
            .header("upgrade", "echo")
            .body(empty())
            .unwrap();
    }
    let grpc = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if grpc {
        // Echo the message, then trailers with the status.
        let mut trailers = http::HeaderMap::new();
        trailers.insert(
            "grpc-status",
            grpc_status
                .parse()
                .unwrap_or(http::HeaderValue::from_static("0")),
        );
        let body = Trailed {
            data: Some(body),
            trailers: Some(trailers),
        };
        return builder(200)
            .header("content-type", "application/grpc")
            .body(BodyExt::boxed(body))
            .unwrap();
    }
    if let Some(url) = &mode.forward_to {
        let (status, body) = match forward(url, &trace).await {
            Ok(answer) => answer,
            Err(err) => (502, Bytes::from(format!("{name}: {err:#}\n"))),
        };
        return builder(status).body(Full::new(body).boxed()).unwrap();
    }
    let status = match (mode.status, mode.fail_every) {
        (Some(status), _) => status,
        (None, Some(every)) if (n - 1).is_multiple_of(every) => 503,
        _ => 200,
    };
    builder(status)
        .body(Full::new(Bytes::from(format!("{name}\n"))).boxed())
        .unwrap()
}

/// GET `url` with `headers` (HTTP/1.1, a connection of its own); the status and body.
async fn forward(url: &str, headers: &[(String, String)]) -> Result<(u16, Bytes)> {
    let uri: http::Uri = url.parse()?;
    let authority = uri.authority().context("no authority")?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((authority.host(), port)).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut request = Request::get(uri.path()).header("host", authority.as_str());
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let response = sender
        .send_request(request.body(http_body_util::Empty::<Bytes>::new())?)
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.into_body().collect().await?.to_bytes()))
}

fn empty() -> Body {
    Full::new(Bytes::new()).boxed()
}

/// A body of one data frame, then trailers (a gRPC response).
struct Trailed {
    data: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl http_body::Body for Trailed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return std::task::Poll::Ready(Some(Ok(Frame::data(data))));
        }
        std::task::Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }
}

/// One curl answer: status and the `x-pod` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Status code (0 when curl got none).
    pub status: u16,
    /// Which pod answered (`x-pod`), empty when none.
    pub pod: String,
}

/// Runs `curl` in `ns` for `count` requests to `url` over one keep-alive connection, with
/// `extra` arguments; returns each answer in order.
pub fn curl_many(ns: &Netns, url: &str, count: usize, extra: &[&str]) -> Result<Vec<Answer>> {
    curl_urls(ns, &vec![url.to_string(); count], extra)
}

/// Runs one `curl` in `ns` requesting each of `urls` in turn over one keep-alive connection.
pub fn curl_urls(ns: &Netns, urls: &[String], extra: &[&str]) -> Result<Vec<Answer>> {
    let count = urls.len();
    let config = std::env::temp_dir().join(format!(
        "mesh-curl-{}-{}.cfg",
        std::process::id(),
        fastrand_u64()
    ));
    let mut text = String::new();
    for url in urls {
        text.push_str(&format!("url = \"{url}\"\noutput = \"/dev/null\"\n"));
    }
    std::fs::write(&config, text)?;
    let mut args: Vec<String> = vec![
        "-sS".into(),
        "--max-time".into(),
        "120".into(),
        "-w".into(),
        "%{http_code} %header{x-pod}\\n".into(),
        "-K".into(),
        config.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ns.exec("curl", &refs);
    let _ = std::fs::remove_file(&config);
    let out = out?;
    let answers: Vec<Answer> = out
        .lines()
        .map(|line| {
            let (code, pod) = line.split_once(' ').unwrap_or((line, ""));
            Answer {
                status: code.trim().parse().unwrap_or(0),
                pod: pod.trim().to_string(),
            }
        })
        .collect();
    if answers.len() != count {
        bail!("curl gave {} answers for {count} requests", answers.len());
    }
    Ok(answers)
}

/// One request with curl in `ns`: `(status, headers, body)`.
pub fn curl(ns: &Netns, args: &[&str]) -> Result<(u16, String, String)> {
    let mut all = vec!["-sS", "--max-time", "20", "-D", "-", "-w", "\n%{http_code}"];
    all.extend_from_slice(args);
    let out = ns.exec("curl", &all).context("curl")?;
    let (rest, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    let (headers, body) = rest
        .split_once("\r\n\r\n")
        .map_or((rest, ""), |(h, b)| (h, b));
    Ok((
        code.trim().parse().unwrap_or(0),
        headers.to_string(),
        body.to_string(),
    ))
}

/// One GET with curl in `ns`: `(status, x-pod, the client's own address)`.
pub fn get(ns: &Netns, url: &str, extra: &[&str]) -> Result<(u16, String, SocketAddr)> {
    let mut args = vec![
        "-sS",
        "--max-time",
        "20",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{local_ip}:%{local_port} %header{x-pod}",
    ];
    args.extend_from_slice(extra);
    args.push(url);
    let out = ns.exec("curl", &args)?;
    let mut parts = out.trim().splitn(3, ' ');
    let status = parts.next().unwrap_or("").parse().unwrap_or(0);
    let local = parts
        .next()
        .unwrap_or("")
        .parse()
        .with_context(|| format!("curl printed no local address: {out}"))?;
    Ok((status, parts.next().unwrap_or("").to_string(), local))
}

/// What `wrk` reports.
#[derive(Debug, Default)]
pub struct Load {
    /// Requests completed.
    pub requests: u64,
    /// Responses that were not 2xx/3xx.
    pub non_2xx: u64,
    /// Socket errors (connect, read, write, timeout).
    pub errors: u64,
    /// Latency percentiles in microseconds: p50, p90, p99.
    pub latency_us: [f64; 3],
}

/// Runs `wrk` in the namespace named `ns` against `url` for `seconds` with `connections`
/// connections (a name, so it can run on another thread while the test changes things).
pub fn wrk(ns: &str, url: &str, connections: u32, seconds: u32) -> Result<Load> {
    wrk_with(ns, url, connections, seconds, &[])
}

/// [`wrk`] with extra request headers (`name: value`).
pub fn wrk_with(
    ns: &str,
    url: &str,
    connections: u32,
    seconds: u32,
    headers: &[&str],
) -> Result<Load> {
    let c = connections.to_string();
    let d = format!("{seconds}s");
    let mut args = vec![
        "netns",
        "exec",
        ns,
        "wrk",
        "-t",
        "1",
        "-c",
        &c,
        "-d",
        &d,
        "--timeout",
        "5s",
        "--latency",
    ];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.push(url);
    let out = crate::netns::sh("ip", &args)?;
    let mut load = Load::default();
    for line in out.lines().map(str::trim) {
        {
            let rest = line;
            if let Some((n, _)) = rest.split_once(" requests in ") {
                load.requests = n.trim().parse().unwrap_or(0);
            }
            if let Some(n) = rest.strip_prefix("Non-2xx or 3xx responses:") {
                load.non_2xx = n.trim().parse().unwrap_or(0);
            }
            for (i, p) in ["50%", "90%", "99%"].iter().enumerate() {
                if let Some(v) = rest.strip_prefix(p) {
                    load.latency_us[i] = micros(v.trim());
                }
            }
            if let Some(errs) = rest.strip_prefix("Socket errors:") {
                load.errors = errs
                    .split(',')
                    .filter_map(|kv| kv.split_whitespace().last()?.parse::<u64>().ok())
                    .sum();
            }
        }
    }
    if load.requests == 0 {
        bail!("wrk completed no request:\n{out}");
    }
    Ok(load)
}

/// wrk's `123.45us` / `1.20ms` / `2.00s` in microseconds.
fn micros(text: &str) -> f64 {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: f64 = n.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        "m" => n * 60e6,
        _ => f64::NAN,
    }
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}

/// `addr` as an `http://` URL with `path`.
pub fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}
