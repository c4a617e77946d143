//! The benchmarks' HTTP/1.1 load generator. Every mode is bounded in time and stops by itself.
//!
//! - [`run`] with a rate: `connections` keep-alive connections share a schedule of `rate`
//!   requests per second; each request's latency is measured from the time the schedule meant
//!   to send it, so a stalled answer counts for every request it held up (no coordinated
//!   omission, as wrk2, Istio's and Linkerd's benchmarks do). With rate 0 each connection
//!   sends its next request as soon as the previous one is answered (the maximum rate).
//! - [`bulk`]: one connection downloading an endless body; bytes per second.
//! - [`connects`]: a new connection for every request (`connection: close`); connections per
//!   second.
//! - [`hold`]: opens connections and keeps them idle.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Serialize;

/// What to send.
#[derive(Clone, Debug)]
pub struct Plan {
    /// `http://host:port/path`.
    pub url: String,
    /// Requests per second, all connections together.
    pub rate: u64,
    /// Keep-alive connections.
    pub connections: usize,
    /// How long to send.
    pub duration: Duration,
    /// Request body size (POST when > 0, else GET).
    pub body: usize,
    /// Extra headers (`name: value`).
    pub headers: Vec<(String, String)>,
}

/// What happened.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Requests answered.
    pub requests: u64,
    /// Answers that were not 2xx.
    pub non_2xx: u64,
    /// Connection or protocol errors.
    pub errors: u64,
    /// Requests per second achieved.
    pub rate: f64,
    /// Latency percentiles in microseconds: p50, p90, p99, p99.9, max.
    pub latency_us: [u64; 5],
    /// The first status that was not 2xx, if any.
    pub first_failure: Option<u16>,
}

/// Runs `plan`; every connection stops at the end of the duration (plus at most 10 s for the
/// answers in flight).
///
/// Each connection runs on its own thread (a current-thread runtime): tokio's timer ticks in
/// milliseconds, so a request is sent by a coarse sleep to 2 ms before its time and a
/// thread sleep (about 50 µs of slack) for the rest; otherwise every latency would include
/// up to a millisecond of timer lateness.
pub fn run(plan: &Plan) -> Result<Report> {
    let uri: http::Uri = plan.url.parse().context("url")?;
    let authority = uri.authority().context("url has no host")?.clone();
    let path = uri
        .path_and_query()
        .map_or("/".to_string(), |p| p.to_string());
    let closed_loop = plan.rate == 0;
    let interval =
        Duration::from_nanos(1_000_000_000 / plan.rate.max(1)).max(Duration::from_nanos(1));
    let histogram = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram")?,
    ));
    let totals = Arc::new(Mutex::new(Report::default()));
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + plan.duration;
    let mut tasks = Vec::new();
    for c in 0..plan.connections.max(1) {
        let (histogram, totals) = (histogram.clone(), totals.clone());
        let (authority, path, plan) = (authority.clone(), path.clone(), plan.clone());
        let connection = async move {
            // A keep-alive connection, and a new one whenever the server answered
            // `connection: close` (as a proxy that hands over to its successor does).
            let open = || async {
                let stream = tokio::net::TcpStream::connect(authority.as_str()).await?;
                stream.set_nodelay(true)?;
                let (sender, conn) =
                    hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                        .await?;
                tokio::spawn(conn);
                Ok::<_, anyhow::Error>(sender)
            };
            let mut sender = open().await?;
            let mut reopen = false;
            let body = Bytes::from(vec![b'x'; plan.body]);
            let step = interval * plan.connections.max(1) as u32;
            // Connection c owns the schedule's slots c, c+n, c+2n, ...
            let mut intended = if closed_loop {
                start
            } else {
                start + interval * c as u32
            };
            while intended < end {
                sleep_precisely(intended).await;
                let mut request = http::Request::builder()
                    .method(if plan.body > 0 { "POST" } else { "GET" })
                    .uri(&path)
                    .header("host", authority.as_str());
                for (k, v) in &plan.headers {
                    request = request.header(k, v);
                }
                let request = request.body(Full::new(body.clone()))?;
                if std::mem::take(&mut reopen) {
                    sender = open().await?;
                }
                let answered = async {
                    sender.ready().await?;
                    let response = sender.send_request(request).await?;
                    let status = response.status();
                    let close = response
                        .headers()
                        .get(http::header::CONNECTION)
                        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                    response.into_body().collect().await?;
                    Ok::<_, hyper::Error>((status, close))
                };
                let outcome = tokio::time::timeout(Duration::from_secs(10), answered).await;
                let latency = intended.elapsed();
                let mut t = totals.lock().unwrap();
                match outcome {
                    Ok(Ok((status, close))) => {
                        reopen = close;
                        t.requests += 1;
                        if !status.is_success() {
                            t.non_2xx += 1;
                            t.first_failure.get_or_insert(status.as_u16());
                        }
                        let us = latency.as_micros().clamp(1, 60_000_000) as u64;
                        let _ = histogram.lock().unwrap().record(us);
                    }
                    _ => {
                        t.errors += 1;
                        return Ok::<_, anyhow::Error>(());
                    }
                }
                drop(t);
                intended = if closed_loop {
                    Instant::now()
                } else {
                    intended + step
                };
            }
            Ok(())
        };
        tasks.push(
            std::thread::Builder::new()
                .name(format!("load-{c}"))
                .spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?
                        .block_on(connection)
                })
                .context("starting a connection thread")?,
        );
    }
    for task in tasks {
        let outcome = task
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the connection thread panicked")));
        if let Err(err) = outcome {
            totals.lock().unwrap().errors += 1;
            eprintln!("mesh-load: connection failed: {err:#}");
        }
    }
    let elapsed = start.elapsed().as_secs_f64().max(1e-9);
    let h = histogram.lock().unwrap();
    let mut report = std::mem::take(&mut *totals.lock().unwrap());
    report.rate = report.requests as f64 / elapsed;
    report.latency_us = [
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max(),
    ];
    Ok(report)
}

/// An endless response body of 64 KiB frames (what the harness's web server answers to
/// `/bytes`); it ends when the client goes away.
pub struct Endless(Bytes);

impl Default for Endless {
    fn default() -> Endless {
        Endless(Bytes::from(vec![b'x'; 64 << 10]))
    }
}

impl http_body::Body for Endless {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(self.0.clone()))))
    }
}

/// Runs the `mesh-load` binary (built next to the running executable) inside namespace `ns`
/// with `args`, and returns the JSON report it prints.
pub fn mesh_load_in(ns: &str, args: &[&str]) -> Result<serde_json::Value> {
    let load = crate::cluster::built_bin("mesh-load")?;
    let load = load.to_str().context("non-UTF-8 path")?;
    let argv: Vec<&str> = ["netns", "exec", ns, load]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    let out = crate::netns::sh("ip", &argv)?;
    serde_json::from_str(out.trim()).with_context(|| format!("mesh-load printed {out:?}"))
}

/// Sleeps until `until`, to within the thread sleep's slack.
async fn sleep_precisely(until: Instant) {
    if let Some(coarse) = until.checked_sub(Duration::from_millis(2)) {
        tokio::time::sleep_until(coarse.into()).await;
    }
    let now = Instant::now();
    if until > now {
        // Blocks only this connection's thread, whose connection is idle until then.
        std::thread::sleep(until - now);
    }
}

/// What [`bulk`] or [`connects`] achieved.
#[derive(Debug, Default, Serialize)]
pub struct Throughput {
    /// Bytes received (bulk) or connections completed (connects).
    pub count: u64,
    /// Connections that failed (connects).
    pub errors: u64,
    /// Seconds measured.
    pub seconds: f64,
    /// `count` per second.
    pub per_second: f64,
}

/// Downloads `url` (an endless body, as the harness's web server sends for `/bytes`) on one
/// connection for `duration` after the first byte; counts the bytes.
pub async fn bulk(url: &str, duration: Duration) -> Result<Throughput> {
    let uri: http::Uri = url.parse().context("url")?;
    let authority = uri.authority().context("url has no host")?.clone();
    let stream = tokio::net::TcpStream::connect(authority.as_str()).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = http::Request::get(uri.path())
        .header("host", authority.as_str())
        .body(Full::new(Bytes::new()))?;
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .context("no answer in 10 s")??;
    anyhow::ensure!(response.status().is_success(), "{}", response.status());
    let mut body = response.into_body();
    let mut count = 0u64;
    let started = Instant::now();
    while started.elapsed() < duration {
        match tokio::time::timeout(Duration::from_secs(5), body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    count += data.len() as u64;
                }
            }
            Ok(None) => break,
            Ok(Some(Err(err))) => return Err(err.into()),
            Err(_) => anyhow::bail!("the download stalled for 5 s"),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Throughput {
        count,
        errors: 0,
        seconds,
        per_second: count as f64 / seconds,
    })
}

/// `workers` loops, each opening a connection, sending one `GET` with `connection: close`,
/// reading the answer to the end and starting again, for `duration`; counts the completed
/// connections. The server closes first, so the client's ports do not pile up in TIME_WAIT.
pub async fn connects(url: &str, workers: usize, duration: Duration) -> Result<Throughput> {
    let uri: http::Uri = url.parse().context("url")?;
    let authority = uri.authority().context("url has no host")?.to_string();
    let path = uri.path().to_string();
    let started = Instant::now();
    let end = started + duration;
    let mut tasks = Vec::new();
    for _ in 0..workers.max(1) {
        let (authority, path) = (authority.clone(), path.clone());
        tasks.push(tokio::spawn(async move {
            let (mut done, mut errors) = (0u64, 0u64);
            while Instant::now() < end {
                let one = async {
                    let stream = tokio::net::TcpStream::connect(authority.as_str()).await?;
                    stream.set_nodelay(true)?;
                    let (mut sender, conn) =
                        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(
                            stream,
                        ))
                        .await?;
                    let conn = tokio::spawn(conn);
                    let request = http::Request::get(path.as_str())
                        .header("host", authority.as_str())
                        .header("connection", "close")
                        .body(Full::new(Bytes::new()))?;
                    let response = sender.send_request(request).await?;
                    let ok = response.status().is_success();
                    response.into_body().collect().await?;
                    let _ = conn.await;
                    anyhow::ensure!(ok, "not 2xx");
                    Ok::<_, anyhow::Error>(())
                };
                match tokio::time::timeout(Duration::from_secs(5), one).await {
                    Ok(Ok(())) => done += 1,
                    _ => errors += 1,
                }
            }
            (done, errors)
        }));
    }
    let mut out = Throughput::default();
    for task in tasks {
        let (done, errors) = task.await?;
        out.count += done;
        out.errors += errors;
    }
    out.seconds = started.elapsed().as_secs_f64();
    out.per_second = out.count as f64 / out.seconds;
    Ok(out)
}

/// Opens `count` TCP connections to `addr` (sending nothing) and returns them; the caller
/// keeps them open as long as it holds them.
pub async fn hold(addr: &str, count: usize) -> Result<Vec<tokio::net::TcpStream>> {
    let mut held = Vec::with_capacity(count);
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..count {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {i} of {count} connections opened in 60 s"
        );
        let stream =
            tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
                .await
                .with_context(|| format!("connection {i} not answered in 5 s"))?
                .with_context(|| format!("connection {i}"))?;
        held.push(stream);
    }
    Ok(held)
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        sync::atomic::{AtomicU64, Ordering},
    };

    use hyper::service::service_fn;
    use hyper_util::rt::TokioExecutor;

    use super::*;

    /// A loopback server that stalls every `stall_every`-th answer by `stall`.
    async fn server(stall_every: u64, stall: Duration) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let count = Arc::new(AtomicU64::new(0));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        let n = count.fetch_add(1, Ordering::Relaxed) + 1;
                        async move {
                            if n.is_multiple_of(stall_every) {
                                tokio::time::sleep(stall).await;
                            }
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                                b"ok",
                            ))))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        url
    }

    /// A loopback server answering every request with an endless body.
    async fn endless_server() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/bytes", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = service_fn(|_req| async {
                        Ok::<_, Infallible>(http::Response::new(Endless::default()))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        url
    }

    #[test]
    fn bulk_connects_hold_and_closed_loop_count_what_happened() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let bytes = bulk(&endless_server().await, Duration::from_millis(300))
                .await
                .unwrap();
            assert!(bytes.count > 1 << 20, "{bytes:?}");
            assert!((0.3..1.0).contains(&bytes.seconds), "{bytes:?}");
            let url = server(u64::MAX, Duration::ZERO).await;
            let made = connects(&url, 2, Duration::from_millis(300)).await.unwrap();
            assert_eq!(made.errors, 0, "{made:?}");
            assert!(made.count > 20, "{made:?}");
            let addr = url.trim_start_matches("http://").trim_end_matches('/');
            assert_eq!(hold(addr, 50).await.unwrap().len(), 50);
            // Rate 0: as fast as answers come, far above a paced rate.
            let mut max = plan(url.clone(), 0);
            max.duration = Duration::from_millis(300);
            let report = run(&max).unwrap();
            assert_eq!((report.errors, report.non_2xx), (0, 0), "{report:?}");
            assert!(report.requests > 100, "{report:?}");
            // Nothing listens: every connection fails and is counted.
            let closed = connects("http://127.0.0.1:1/", 1, Duration::from_millis(100))
                .await
                .unwrap();
            assert_eq!(closed.count, 0);
            assert!(closed.errors > 0);
        });
    }

    fn plan(url: String, rate: u64) -> Plan {
        Plan {
            url,
            rate,
            connections: 1,
            duration: Duration::from_millis(1500),
            body: 1024,
            headers: Vec::new(),
        }
    }

    #[test]
    fn holds_the_rate_and_counts_stalls_for_every_request_they_delay() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let fast = server(u64::MAX, Duration::ZERO).await;
            let report = run(&plan(fast, 400)).unwrap();
            assert_eq!((report.errors, report.non_2xx), (0, 0), "{report:?}");
            assert!((540..=660).contains(&report.requests), "{report:?}");
            // One answer in 100 stalls 200 ms at 200 requests/s on one connection: the ~40
            // requests scheduled during each stall are late too, so p99 shows it, where
            // timing each request from its actual send would not.
            let stalling = server(100, Duration::from_millis(200)).await;
            let report = run(&plan(stalling, 200)).unwrap();
            assert!(report.latency_us[2] >= 100_000, "{report:?}");
            assert!(report.latency_us[0] < 100_000, "{report:?}");
        });
    }
}
