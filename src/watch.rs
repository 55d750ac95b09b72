//! Hot reload of the config file.
//!
//! The directory is watched rather than the file, because editors and Kubernetes
//! ConfigMaps replace files by rename or symlink swap. Events are debounced, and a
//! reload happens only when the content changed. A file that fails to parse or
//! compile is logged with its location and the last good snapshot keeps serving.
//! SIGHUP forces a reload check too.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::FileConfig;
use crate::store::Store;

pub struct ConfigWatcher {
    _watcher: notify::RecommendedWatcher,
}

/// Starts watching `path`; `loaded` is the text the store was built from. Only its
/// digest is kept: a large config need not stay in memory to detect a change.
pub fn spawn(path: PathBuf, loaded: &str, store: Arc<Store>) -> notify::Result<ConfigWatcher> {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let name = path.file_name().map(|n| n.to_owned());
    let event_tx = tx.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && may_change_content(&event.kind)
            && event
                .paths
                .iter()
                .any(|p| name.is_none() || p.file_name() == name.as_deref() || is_k8s_swap(p))
        {
            let _ = event_tx.send(());
        }
    })?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;

    #[cfg(unix)]
    {
        let hup_tx = tx;
        tokio::spawn(async move {
            if let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            {
                while hup.recv().await.is_some() {
                    let _ = hup_tx.send(());
                }
            }
        });
    }

    let digest = |t: &str| <sha2::Sha256 as sha2::Digest>::digest(t.as_bytes());
    let mut current = digest(loaded);
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Debounce: editors write in several steps.
            tokio::time::sleep(Duration::from_millis(100)).await;
            while rx.try_recv().is_ok() {}
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "config file unreadable; keeping the last good configuration");
                    continue;
                }
            };
            if digest(&text) == current {
                continue;
            }
            let file = path.display().to_string();
            // Parsed on a thread of its own, like the first load (`memory::in_own_arena`).
            let parsed = crate::memory::in_own_arena(|| FileConfig::parse(&text, &file));
            // An empty file is what a reader sees mid-way through a truncate-and-write:
            // never take it for "no routes".
            let result = match parsed {
                _ if text.trim().is_empty() => Err(format!(
                    "{file}: the file is empty (write `routes: []` to remove every route)"
                )),
                Ok(config) => store
                    .reload_file(&config, &file)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(()) => {
                    tracing::info!(file = %file, "configuration reloaded");
                    metrics::counter!("portcullis_config_reloads_total", "result" => "ok")
                        .increment(1);
                }
                Err(error) => {
                    tracing::error!(%error, "configuration rejected; keeping the last good configuration");
                    metrics::counter!("portcullis_config_reloads_total", "result" => "error")
                        .increment(1);
                }
            }
            current = digest(&text);
            drop(text);
            // Off the runtime's workers: trimming a large heap takes milliseconds.
            let _ = tokio::task::spawn_blocking(crate::memory::release_free_memory).await;
        }
    });
    Ok(ConfigWatcher { _watcher: watcher })
}

/// Whether an event can mean the file's content changed. Opening, reading and closing
/// the file are events too (inotify's IN_OPEN, IN_ACCESS, IN_CLOSE_NOWRITE), and the
/// reload check reads the file: reacting to them made each check schedule the next, so
/// once anything had opened the file (`cat`, `portcullis validate`) the process re-read
/// and hashed it every ~125 ms for good (a 20 MB config: 14 % of a core while idle,
/// +20 MiB of RSS).
/// A write is seen as a modification or as the writer closing the file.
fn may_change_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Kubernetes updates a mounted ConfigMap by swapping the `..data` symlink.
fn is_k8s_swap(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("..data"))
}
