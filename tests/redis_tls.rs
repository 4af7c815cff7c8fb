//! The Redis store over TLS (`rediss://`, feature `redis-tls`): against a `redis-server` that
//! this test starts with a certificate it makes (`openssl`) and trusts through the client's root
//! certificates.
mod redis_support;
mod support;

use std::path::Path;
use std::process::Command;

use idem_runtime::redis::{self, TlsCertificates};
use idem_runtime::{Call, Error, Options, RedisStore, Token, run};
use redis_support::{RedisServer, StartError, free_port};

fn openssl(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("openssl cannot be run: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A CA and a server certificate for 127.0.0.1 and localhost, signed by it.
fn make_certs(dir: &Path) -> Result<(), String> {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=idem test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    )?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    )?;
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .map_err(|e| e.to_string())?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_over_tls() {
    let dir = std::env::temp_dir().join(format!("idem-redis-tls-{}", Token::generate().to_hex()));
    std::fs::create_dir_all(&dir).unwrap();
    if let Err(e) = make_certs(&dir) {
        let _ = std::fs::remove_dir_all(&dir);
        support::server_missing("openssl (to make the test certificates)", "PATH", e);
        return;
    }
    let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let tls_port = free_port().to_string();
    let (cert, key, ca) = (path("server.crt"), path("server.key"), path("ca.crt"));
    let server = RedisServer::start_with(&[
        // Plain port off: only TLS is served.
        "--port",
        "0",
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
    ]);
    let _server = match server {
        Ok(s) => s,
        Err(StartError::Missing(e)) => {
            let _ = std::fs::remove_dir_all(&dir);
            support::server_missing("redis-server", "PATH", e);
            return;
        }
        Err(e) => panic!("could not start redis-server with TLS: {e}"),
    };
    let client = redis::Client::build_with_tls(
        format!("rediss://127.0.0.1:{tls_port}"),
        TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(dir.join("ca.crt")).unwrap()),
        },
    )
    .unwrap();
    let store = RedisStore::from_client(client).await.unwrap();
    let opts = Options::with_scope(format!("tls:{}", Token::generate().to_hex()));
    for _ in 0..2 {
        let out: Result<String, Error> = run(&store, &opts, Call::new("k"), || async {
            Ok("over tls".to_owned())
        })
        .await;
        assert_eq!(out.unwrap(), "over tls");
    }
    // A client that does not trust the CA is refused: its calls fail closed.
    let untrusted = RedisStore::from_url(&format!("rediss://127.0.0.1:{tls_port}"))
        .await
        .unwrap();
    let refused: Result<String, Error> = run(&untrusted, &opts, Call::new("other"), || async {
        Ok("must not run".to_owned())
    })
    .await;
    assert!(
        matches!(refused, Err(Error::Unavailable { .. })),
        "{refused:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
