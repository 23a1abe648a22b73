//! The lease over TLS against a real TLS-enabled ZooKeeper (PEM keystore, client certificates required).

mod support;

use std::time::Duration;

use nbd_failover::lease::{LeaseError, LeaseNotice, LeaseService, TlsFiles};
use support::{chroot, is_won, lease_config, Notices, TestPki, ZkServer};

const T: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_over_tls_with_client_certificates() {
    let pki = TestPki::generate();
    let zk = ZkServer::start_tls(&support::zk::ServerTls {
        keystore: pki.server_keystore.clone(),
        truststore: pki.ca.clone(),
    });
    let root = chroot("tls");
    let tls = TlsFiles {
        ca_file: pki.ca.clone(),
        cert_file: Some(pki.client_cert.clone()),
        key_file: Some(pki.client_key.clone()),
    };

    let mut cfg = lease_config(&zk.secure_address(), &root, "a", T);
    cfg.tls = Some(tls.clone());
    let (a, rx) = LeaseService::start(cfg).await.unwrap_or_else(|e| {
        panic!(
            "lease over TLS did not start: {e}\nserver log:\n{}",
            zk.log_tail()
        )
    });
    let mut notices = Notices::new();
    notices.add(0, rx);
    a.contend("v").unwrap();
    notices
        .wait("Won over TLS", Duration::from_secs(15), |_, n| is_won(n))
        .await;
    notices
        .wait("heartbeat over TLS", Duration::from_secs(5), |_, n| {
            matches!(n, LeaseNotice::Heartbeat { .. })
        })
        .await;
    println!(
        "TLS session {:#x}: won and heartbeating on the TLS port {}",
        a.session_id().unwrap(),
        zk.secure_port.unwrap()
    );

    // A server certificate from another CA is refused, with a clear error.
    let mut wrong_ca = lease_config(&zk.secure_address(), &root, "b", T);
    wrong_ca.connect_timeout = Duration::from_secs(3);
    wrong_ca.tls = Some(TlsFiles {
        ca_file: pki.other_ca.clone(),
        ..tls.clone()
    });
    let err = LeaseService::start(wrong_ca)
        .await
        .err()
        .expect("an untrusted server must be refused");
    println!("untrusted server certificate: {err}");
    assert!(matches!(err, LeaseError::Connect { .. }), "{err}");

    // Without a client certificate the server (clientAuth=need) refuses us.
    let mut no_cert = lease_config(&zk.secure_address(), &root, "c", T);
    no_cert.connect_timeout = Duration::from_secs(3);
    no_cert.tls = Some(TlsFiles {
        cert_file: None,
        key_file: None,
        ..tls.clone()
    });
    let err = LeaseService::start(no_cert)
        .await
        .err()
        .expect("no client certificate must be refused");
    println!("no client certificate: {err}");

    // A missing key file is a configuration error naming the file.
    let mut missing = lease_config(&zk.secure_address(), &root, "d", T);
    missing.tls = Some(TlsFiles {
        key_file: Some(pki.dir.path().join("nope.key")),
        ..tls
    });
    let err = LeaseService::start(missing)
        .await
        .err()
        .expect("missing key");
    assert!(
        matches!(
            &err,
            LeaseError::Tls {
                what: "key file",
                ..
            }
        ) && err.to_string().contains("nope.key"),
        "{err}"
    );
}
