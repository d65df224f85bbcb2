//! End to end with a real gateway: nginx (`auth_request`) in front of a small upstream, asking a
//! 3-node Cascade cluster's `/forward-auth` whether to let each request through.
//!
//! nginx comes from the system (`.ci/run` installs Debian's package). Without it the test says
//! so and passes, except under `CI=true`, where a missing nginx fails it.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::cluster::TestCluster;
use support::dpop::DeviceKey;
use support::http::{request, try_request, Answer};
use support::*;

/// How long nginx may take to accept connections.
const NGINX_START_DEADLINE: Duration = Duration::from_secs(10);

fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// nginx in the foreground (one process), killed on drop.
struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nginx {
    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

/// The configuration under test: `location /` asks Cascade (`auth_request`), passes the user it
/// names to the upstream, and the upstream echoes it.
fn config(dir: &Path, app: SocketAddr, upstream: SocketAddr, cascade_http: SocketAddr) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  server {{
    listen {app};
    location = /_cascade {{
      internal;
      proxy_pass http://{cascade_http}/forward-auth;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Forwarded-Method $request_method;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $http_host;
      proxy_set_header X-Forwarded-Uri $request_uri;
      proxy_set_header X-Cascade-Jkt "";
      proxy_connect_timeout 2s;
      proxy_read_timeout 5s;
    }}
    location / {{
      auth_request /_cascade;
      auth_request_set $cascade_user $upstream_http_x_cascade_user;
      proxy_set_header X-User $cascade_user;
      proxy_pass http://{upstream};
    }}
  }}
  server {{
    listen {upstream};
    location / {{ return 200 "hello $http_x_user\n"; }}
  }}
}}
"#
    )
}

async fn start_nginx(binary: &Path, cascade_http: SocketAddr) -> (Nginx, SocketAddr) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (app, upstream) = (free_loopback_addr(), free_loopback_addr());
    let conf = dir.path().join("nginx.conf");
    std::fs::write(&conf, config(dir.path(), app, upstream, cascade_http)).expect("write nginx.conf");
    let child = Command::new(binary)
        .arg("-p")
        .arg(dir.path())
        .arg("-e")
        .arg(dir.path().join("error.log"))
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    let nginx = Nginx { child, dir };
    let start = Instant::now();
    while try_request(app, "GET", "/", &[], "").await.is_err() {
        assert!(start.elapsed() < NGINX_START_DEADLINE, "nginx did not start:\n{}", nginx.error_log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (nginx, app)
}

/// `GET /orders?id=1` through nginx with `headers`.
async fn get(app: SocketAddr, headers: &[(&str, &str)]) -> Answer {
    request(app, "GET", "/orders?id=1", headers, "").await
}

/// A DPoP-bound request to nginx by `key` for session `sid`, with a fresh proof id.
async fn dpop_get(app: SocketAddr, key: &DeviceKey, sid: &str, jti: &str) -> Answer {
    let proof = key.proof("GET", &format!("http://{app}/orders"), sid, now_ms() / 1000, jti);
    let auth = format!("DPoP {sid}");
    get(app, &[("Authorization", &auth), ("DPoP", &proof)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_in_front_of_a_cluster() {
    let Some(binary) = nginx_binary() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install nginx (.ci/run does: apt-get install nginx)"
        );
        eprintln!("SKIPPED: nginx is not installed (apt-get install -y nginx); CI runs this test");
        return;
    };
    let mut cluster = TestCluster::start_with(3, 4, |c| c.http_listen = Some(free_loopback_addr())).await;
    let gateway_node = cluster.members[0].config.http_listen.expect("HTTP address");
    let (nginx, app) = start_nginx(&binary, gateway_node).await;
    let mut client = cluster.members[0].client().await;
    let device = DeviceKey::new(42);
    let alice = create(&mut client, create_req("acme", "alice", "web")).await.session_id;
    let bob = create(&mut client, bound(create_req("acme", "bob", "mobile"), "phone", &device.jkt()))
        .await
        .session_id;
    let alice_auth = format!("Bearer {alice}");

    // A valid session passes, and the upstream learns who it is.
    let a = get(app, &[("Authorization", &alice_auth)]).await;
    assert_eq!((a.status, a.body.as_str()), (200, "hello alice\n"), "{a:?}\n{}", nginx.error_log());
    // No token: 401 with the challenge passed through.
    let a = get(app, &[]).await;
    assert_eq!(a.status, 401, "{a:?}");
    assert!(a.header("www-authenticate").is_some(), "{a:?}");
    // A device-bound session with a proof by its key passes; by another key it is refused (403);
    // a replayed proof is refused (401).
    let a = dpop_get(app, &device, &bob, "n1").await;
    assert_eq!((a.status, a.body.as_str()), (200, "hello bob\n"), "{a:?}");
    let a = dpop_get(app, &DeviceKey::new(43), &bob, "n2").await;
    assert_eq!(a.status, 403, "device mismatch: {a:?}");
    let a = dpop_get(app, &device, &bob, "n1").await;
    assert_eq!(a.status, 401, "replayed proof: {a:?}");
    // A client cannot claim a key through the trusted-thumbprint header.
    let bob_bearer = format!("Bearer {bob}");
    let jkt = device.jkt();
    let a = get(app, &[("Authorization", &bob_bearer), ("X-Cascade-Jkt", &jkt)]).await;
    assert_eq!(a.status, 403, "{a:?}");

    // `cascade revoke user` on another node; the same request is refused within the bound.
    let other = cluster.members[1].addr;
    let out = Command::new(env!("CARGO_BIN_EXE_cascade"))
        .args(["--addr", &format!("http://{other}"), "revoke", "user", "--tenant", "acme", "--user", "alice"])
        .output()
        .expect("run cascade revoke user");
    let acked = Instant::now();
    assert!(out.status.success(), "cascade revoke user failed: {}", String::from_utf8_lossy(&out.stderr));
    let refused = poll_until("nginx to refuse alice after the revocation", STATE_DEADLINE, || async {
        let a = get(app, &[("Authorization", &alice_auth)]).await;
        (a.status != 200).then_some(a)
    })
    .await;
    let took = acked.elapsed();
    assert_eq!(refused.status, 401, "{refused:?}");
    let bound_ms = cluster.members[0].config.revocation_bound_ms;
    assert!(
        took <= Duration::from_millis(bound_ms + 500),
        "refused {took:?} after the ack (bound {bound_ms} ms)"
    );
    eprintln!("nginx refused the revoked user {took:?} after `cascade revoke user` returned");

    // The Cascade node nginx asks goes down: nginx fails closed (500), even for a valid session.
    cluster.members[0].stop().await;
    let a = dpop_get(app, &device, &bob, "n3").await;
    assert_eq!(a.status, 500, "nginx must fail closed while Cascade is down: {a:?}");
    assert!(!a.body.contains("hello"), "{a:?}");
    // And it passes again once the node is back.
    cluster.members[0].start().await;
    let a = poll_until("nginx to pass bob again after the node restarts", READY_DEADLINE, || async {
        let a = dpop_get(app, &device, &bob, &format!("r{}", now_ms())).await;
        (a.status == 200).then_some(a)
    })
    .await;
    assert_eq!(a.body, "hello bob\n");
    drop(nginx);
}
