//! One shutdown signal per process: SIGINT or SIGTERM (or `cancel()` in tests) fires a cancellation
//! token every task can await, so services stop pulling work, finish what is in flight and exit.

/// The shutdown signal: tokio-util's [`CancellationToken`](tokio_util::sync::CancellationToken)
/// (`cancel` fires it, `cancelled().await` waits for it, `child_token` gives a signal that also
/// fires on its own).
pub use tokio_util::sync::CancellationToken as Shutdown;

/// A signal that also fires on SIGINT or SIGTERM.
pub fn on_signals() -> Shutdown {
    let shutdown = Shutdown::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        trigger.cancel();
    });
    shutdown
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
