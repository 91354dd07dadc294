//! With the metrics listener off, a service installs no metrics recorder: one that nobody renders or
//! upkeeps would keep every histogram sample for the life of the process (the scheduler's memory grew
//! by ~16 bytes per execution that way). Alone in its test binary, because the recorder is global to
//! the process.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use deepnode_bus::subjects::Subjects;
use deepnode_domain::config::PolicyConfig;
use deepnode_runtime::observability::{self, ObservabilityOptions};
use deepnode_runtime::{ServiceContext, Shutdown};
use deepnode_testkit::{nats_url, TestDb};

#[tokio::test]
async fn the_listener_off_installs_no_recorder() {
    let db = TestDb::new().await;
    let nats = async_nats::connect(nats_url()).await.unwrap();
    let ctx = ServiceContext::new(
        db.store().await,
        nats,
        Subjects::random(),
        PolicyConfig::default(),
        "metrics-off-test",
    );
    let options = ObservabilityOptions {
        addr: None,
        ..ObservabilityOptions::on("127.0.0.1:0".parse().unwrap(), &[])
    };
    let shutdown = Shutdown::new();
    let started = observability::start(&ctx, options, shutdown.clone())
        .await
        .unwrap();
    assert_eq!(started.local_addr, None);

    // Installing a recorder succeeds only if none was installed before.
    assert!(
        metrics::set_global_recorder(metrics::NoopRecorder).is_ok(),
        "starting with the listener off installed a metrics recorder"
    );
    shutdown.cancel();
}
