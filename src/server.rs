//! Starts the fronts, and stops them without dropping a Check.
//!
//! Shutdown on SIGTERM/SIGINT: health turns NOT_SERVING and `/readyz` 503 so load
//! balancers and Envoy's health checks move away, then every listener stops
//! accepting and in-flight Checks finish (bounded by the drain timeout).
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic_health::ServingStatus;

use crate::check_threads::{self, CheckThreads};
use crate::config::{ConfigError, DEFAULT_CONFIG, FileConfig, StoreKind};
use crate::grpc::{EXT_AUTHZ_DESCRIPTOR, Front, SERVICE_NAME};
use crate::runtime::Runtime;
use crate::store::{LoadError, Store};
use crate::{admin, http, telemetry, watch as config_watch};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot watch the config file: {0}")]
    Watch(#[from] notify::Error),
    #[error(transparent)]
    Grpc(#[from] check_threads::ThreadsError),
    #[error("cannot serve reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

pub struct Options {
    pub config: Option<PathBuf>,
    pub drain_timeout: Duration,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { what, addr, source })
}

pub async fn serve(opts: Options) -> Result<(), ServeError> {
    let (mut config, text, file) = match &opts.config {
        Some(path) => {
            let (config, text) = crate::memory::in_own_arena(|| FileConfig::load(path))?;
            (config, text, path.display().to_string())
        }
        None => (
            FileConfig::parse(DEFAULT_CONFIG, "(built-in default)")?,
            DEFAULT_CONFIG.to_owned(),
            "(built-in default)".to_owned(),
        ),
    };
    let metrics_handle = telemetry::init_metrics();
    let runtime = Arc::new(Runtime::default());
    let state_path = config.state_path(opts.config.as_deref());
    let store = match config.store.kind {
        StoreKind::File => {
            let store = Arc::new(Store::open(
                runtime.clone(),
                &config,
                &file,
                state_path.clone(),
            )?);
            tracing::info!(
                config = %file,
                state_file = %state_path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "(none)".into()),
                routes = runtime.snapshot().router.len(),
                "configuration loaded"
            );
            store
        }
        StoreKind::Etcd => Store::open_etcd(runtime.clone(), &config).await?,
    };
    // The store holds its own copy of the resources; with 100k consumers the parsed
    // lists kept here for the process's lifetime would double the memory.
    config.routes = Vec::new();
    config.consumers = Vec::new();

    let (stop_tx, stop_rx) = watch::channel(false);

    // gRPC: ext_authz, health, reflection.
    let (mut health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;
    health_reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let grpc_listener = bind("grpc", config.listen.grpc).await?;
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(EXT_AUTHZ_DESCRIPTOR)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder().build_v1()?;
    let reflection_alpha = reflection_builder().build_v1alpha()?;
    let others = tonic::service::Routes::new(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha);
    let threads = CheckThreads::start(
        config
            .listen
            .grpc_threads
            .map_or_else(check_threads::default_count, |n| n.get()),
        Front::new(runtime.clone(), others),
        stop_rx.clone(),
    )?;
    let grpc = tokio::spawn(threads.serve(grpc_listener, stop_rx.clone()));

    // HTTP: health, readiness, metrics, auth_request.
    let http_listener = bind("http", config.listen.http).await?;
    let http_app = http::router(http::HttpState {
        runtime: runtime.clone(),
        metrics: metrics_handle,
        auth_path: config.auth_request.path.as_str().into(),
        original: config.auth_request.original,
    });
    let http = tokio::spawn(
        axum::serve(
            http_listener,
            http_app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(stopped(stop_rx.clone()))
        .into_future(),
    );

    // Admin API, only with a key.
    let admin = match config.admin.api_key.clone() {
        Some(key) => {
            let listener = bind("admin", config.listen.admin).await?;
            let app = admin::router(admin::AdminState {
                store: store.clone(),
                api_key: key.into(),
            });
            tracing::info!(addr = %config.listen.admin, "Admin API enabled");
            Some(tokio::spawn(
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped(stop_rx.clone()))
                    .into_future(),
            ))
        }
        None => {
            tracing::info!("Admin API disabled (no admin.api_key)");
            None
        }
    };

    let _watcher = match &opts.config {
        Some(path) => Some(config_watch::spawn(path.clone(), &text, store.clone())?),
        None => None,
    };
    drop(text);
    crate::memory::release_free_memory();
    tracing::info!(grpc = %config.listen.grpc, http = %config.listen.http, "portcullis serving");

    shutdown_signal().await;
    tracing::info!("shutting down: draining in-flight Checks");
    runtime.start_draining();
    for service in [SERVICE_NAME, ""] {
        health_reporter
            .set_service_status(service, ServingStatus::NotServing)
            .await;
    }
    // Watch streams end only when their status is cleared; an open one (client-side
    // health checking) would otherwise hold the graceful shutdown for the whole drain
    // timeout. Watchers have just been told NOT_SERVING.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for service in [SERVICE_NAME, ""] {
        health_reporter.clear_service_status(service).await;
    }
    let _ = stop_tx.send(true);
    let drain = async {
        if let Ok(Err(e)) = grpc.await {
            tracing::error!(error = %e, "gRPC front");
        }
        let _ = http.await;
        if let Some(admin) = admin {
            let _ = admin.await;
        }
    };
    if tokio::time::timeout(opts.drain_timeout, drain)
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?opts.drain_timeout, "drain timeout reached; exiting");
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Resolves once `stop` turns true (or its sender is gone): the graceful-shutdown
/// signal every front of the server is given.
pub(crate) async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
