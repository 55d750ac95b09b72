//! The gRPC front runs on threads of its own, one single-threaded tokio runtime each,
//! and every accepted connection is handed to the thread holding the fewest.
//!
//! Why not the process's work-stealing runtime: hyper spawns a task per HTTP/2
//! stream, and on a work-stealing runtime that task wakes an idle worker which
//! steals it, so every Check paid futex wake-ups and moved between cores. Measured
//! with h2load on this project's 2-core benchmark machine (docs/benchmarks.md,
//! change 30), portcullis spent ≈ 35–45 % less CPU per Check with the connection,
//! its streams and its decision on one thread. Envoy keeps one HTTP/2 connection per
//! worker thread to an ext_authz cluster, so with the least-loaded hand-off below a
//! few long-lived connections still spread over all threads; the price is that one
//! connection never uses more than one core (`grpc_threads` says how many there are).
//!
//! Accepting stays on the main runtime; an accepted socket is deregistered there and
//! registered with its thread's own reactor, so its readiness wakes only that thread.
use std::io;
use std::net::TcpStream as StdTcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::grpc::Front;

/// Why the gRPC front could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ThreadsError {
    #[error("cannot start gRPC thread {index}: {source}")]
    Spawn { index: usize, source: io::Error },
    #[error("gRPC thread {index} panicked")]
    Panicked { index: usize },
}

/// How many threads serve gRPC when the config leaves it to us: one per CPU this
/// process may use (`available_parallelism` honours cgroup CPU quotas, so a pod
/// limited to 2 CPUs gets 2 threads on a 64-core node).
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

struct Thread {
    /// Open connections this thread serves; the accept loop hands a new one to the
    /// thread with the fewest.
    open: Arc<AtomicUsize>,
    handoff: mpsc::UnboundedSender<Handoff>,
    handle: JoinHandle<()>,
}

struct Handoff {
    socket: StdTcpStream,
    open: OpenGuard,
}

/// Counts a connection as open on its thread until the connection is dropped.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a thread out of `serving` when its server has ended, even by a panic.
struct Served(Arc<watch::Sender<usize>>);

impl Drop for Served {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// The gRPC threads, fed by one accept loop.
pub struct CheckThreads {
    threads: Vec<Thread>,
}

impl CheckThreads {
    /// Starts `count` threads, each serving `front` until `stop` turns true; they then
    /// finish their in-flight Checks and close their connections gracefully (GOAWAY).
    pub fn start(
        count: usize,
        front: Front,
        stop: watch::Receiver<bool>,
    ) -> Result<CheckThreads, ThreadsError> {
        let count = count.max(1);
        // Tasks a Check spawns (a pooled HTTP connection to an IdP or auth service, a
        // Redis connection) live on the runtime that spawned them and may serve the
        // other threads' Checks too: no runtime is dropped while any thread drains.
        let serving = Arc::new(watch::Sender::new(count));
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let serving = serving.clone();
            let (handoff, received) = mpsc::unbounded_channel::<Handoff>();
            let front = front.clone();
            let stop = stop.clone();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| ThreadsError::Spawn { index, source })?;
            let handle = std::thread::Builder::new()
                .name(format!("grpc-{index}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        let mut all_done = serving.subscribe();
                        let done = Served(serving);
                        serve(front, received, stop).await;
                        drop(done);
                        let _ = all_done.wait_for(|n| *n == 0).await;
                    })
                })
                .map_err(|source| ThreadsError::Spawn { index, source })?;
            threads.push(Thread {
                open: Arc::new(AtomicUsize::new(0)),
                handoff,
                handle,
            });
        }
        Ok(CheckThreads { threads })
    }

    /// Accepts connections until `stop` turns true, handing each to the thread with
    /// the fewest open ones.
    pub async fn accept(&self, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.wait_for(|s| *s) => return,
            };
            let socket = match accepted {
                Ok((socket, _)) => socket,
                Err(e) if connection_gone(&e) => continue,
                Err(e) => {
                    // Out of file descriptors and the like: the listener stays
                    // readable, so retrying at once would spin.
                    tracing::warn!(error = %e, "gRPC listener: cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // A client that has already reset fails here; that is its connection's
            // end, not the listener's, so the next accept follows at once.
            let socket = match prepare(socket) {
                Ok(socket) => socket,
                Err(e) => {
                    tracing::debug!(error = %e, "gRPC listener: dropped a connection as it arrived");
                    continue;
                }
            };
            let thread = self
                .threads
                .iter()
                .min_by_key(|t| t.open.load(Ordering::Relaxed))
                .expect("at least one gRPC thread");
            thread.open.fetch_add(1, Ordering::Relaxed);
            let handoff = Handoff {
                socket,
                open: OpenGuard(thread.open.clone()),
            };
            if thread.handoff.send(handoff).is_err() {
                // The thread has ended (its error is reported by `join`); the
                // connection is closed as the hand-off drops.
                tracing::error!("gRPC listener: the gRPC thread has stopped");
            }
        }
    }

    /// Accepts connections until `stop` turns true, then waits for every thread to
    /// finish its connections: the whole life of the gRPC front, for `server`.
    pub async fn serve(
        self,
        listener: TcpListener,
        stop: watch::Receiver<bool>,
    ) -> Result<(), ThreadsError> {
        self.accept(listener, stop).await;
        self.join().await
    }

    /// Open connections per thread, in thread order.
    pub fn open_connections(&self) -> Vec<usize> {
        self.threads
            .iter()
            .map(|t| t.open.load(Ordering::Relaxed))
            .collect()
    }

    /// Waits for every thread to finish its connections and reports the first error.
    pub async fn join(self) -> Result<(), ThreadsError> {
        let mut first = Ok(());
        for (index, thread) in self.threads.into_iter().enumerate() {
            drop(thread.handoff);
            let result = match tokio::task::spawn_blocking(move || thread.handle.join()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) | Err(_) => Err(ThreadsError::Panicked { index }),
            };
            if first.is_ok() {
                first = result;
            }
        }
        first
    }
}

/// The HTTP/2 receive window of every stream and of each connection as a whole.
const FLOW_CONTROL_WINDOW: u32 = 1 << 20;

/// One thread's server: serves the connections handed to it over HTTP/2 until `stop`
/// turns true, then sends each a GOAWAY and waits until their in-flight requests are
/// answered and the client has closed them, as tonic's graceful shutdown does.
async fn serve(
    front: Front,
    mut received: mpsc::UnboundedReceiver<Handoff>,
    stop: watch::Receiver<bool>,
) {
    // No limit on concurrent streams: Envoy multiplexes every worker's Checks on one
    // connection. Fixed flow-control windows, not hyper's adaptive one: that starts at
    // 64 KiB, so a Check carrying Envoy's `with_request_body` (64 KiB by default plus
    // the headers) waited a round trip for window, and it takes a lock and the clock on
    // every frame and pings to estimate bandwidth. Checks with 64 KiB bodies: 12 %
    // more req/s, 17 % less system time (docs/benchmarks.md, change 41). 1 MiB is
    // hyper's own fixed default. No `date` header: gRPC does not use it, and Envoy
    // would decode it on every answer.
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(None)
        .adaptive_window(false)
        .initial_stream_window_size(FLOW_CONTROL_WINDOW)
        .initial_connection_window_size(FLOW_CONTROL_WINDOW)
        .auto_date_header(false);
    let graceful = GracefulShutdown::new();
    let stopped = crate::server::stopped(stop);
    tokio::pin!(stopped);
    loop {
        let handoff = tokio::select! {
            handoff = received.recv() => handoff,
            _ = &mut stopped => break,
        };
        let Some(Handoff { socket, open }) = handoff else {
            break;
        };
        // Registering with this thread's reactor must happen on this thread, so the
        // socket crosses over as a std socket.
        let io = match TcpStream::from_std(socket) {
            Ok(io) => io,
            Err(e) => {
                tracing::debug!(error = %e, "gRPC thread: cannot take a connection");
                continue;
            }
        };
        let conn = graceful.watch(http2.serve_connection(TokioIo::new(io), front.clone()));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "gRPC connection ended with an error");
            }
            // The connection is closed: it no longer counts on this thread.
            drop(open);
        });
    }
    graceful.shutdown().await;
}

/// Errors of the one connection being accepted, which the next accept does not share.
fn connection_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

/// Nagle would hold the trailers frame of a Check until the peer's delayed ACK
/// (~40 ms stalls, docs/benchmarks.md change 1); the socket then leaves this
/// runtime's reactor.
fn prepare(socket: TcpStream) -> io::Result<StdTcpStream> {
    socket.set_nodelay(true)?;
    socket.into_std()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Runtime;
    use tonic::service::Routes;
    use tonic::transport::Endpoint;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    async fn wait_for(threads: &CheckThreads, want: &[usize]) {
        for _ in 0..200 {
            if threads.open_connections() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(threads.open_connections(), want);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_spread_over_the_threads_and_stop_gracefully() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let (stop_tx, stop_rx) = watch::channel(false);
        let threads = Arc::new(
            CheckThreads::start(
                3,
                Front::new(Arc::new(Runtime::default()), Routes::new(health)),
                stop_rx.clone(),
            )
            .unwrap(),
        );
        let accept = tokio::spawn({
            let threads = threads.clone();
            async move { threads.accept(listener, stop_rx).await }
        });

        // Six long-lived connections, like Envoy's one per worker: two per thread.
        let mut clients = Vec::new();
        for n in 1..=6 {
            let channel = Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut client = HealthClient::new(channel);
            let answer = client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .unwrap();
            assert_eq!(answer.into_inner().status, 1, "SERVING");
            clients.push(client);
            let want: Vec<usize> = (0..3).map(|t| (n + 2 - t) / 3).collect();
            wait_for(&threads, &want).await;
        }
        wait_for(&threads, &[2, 2, 2]).await;

        // A closed connection frees its slot, and the next one goes there.
        clients.truncate(5);
        wait_for(&threads, &[2, 2, 1]).await;
        let mut client = HealthClient::new(
            Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
        client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        wait_for(&threads, &[2, 2, 2]).await;

        // Stopping closes the open connections gracefully and ends every thread.
        stop_tx.send(true).unwrap();
        accept.await.unwrap();
        let threads = Arc::into_inner(threads).expect("the accept loop has ended");
        tokio::time::timeout(Duration::from_secs(10), threads.join())
            .await
            .expect("the threads stop with connections open")
            .unwrap();
    }
}
