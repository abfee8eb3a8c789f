//! Hostile and broken peers: a receiver that cuts its answer short mid-body, a name
//! that does not resolve. Each must end in a clean rollback (exit 1), the web config
//! byte-identical, nothing pending.

mod util;

use std::io::{Read, Write};
use std::net::TcpListener;

use util::*;

/// A fake remote-write receiver: accepts writes (204) and answers queries with a
/// response cut off in the middle of its body.
fn truncating_receiver() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in l.incoming().take(64) {
            let Ok(mut c) = conn else { continue };
            let mut buf = vec![0u8; 65536];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&got);
            if head.starts_with("POST /api/v1/write") {
                // Drain the body (Content-Length), then accept it.
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                let body_start = got
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map(|p| p + 4)
                    .unwrap_or(got.len());
                let mut have = got.len() - body_start;
                while have < len {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => have += n,
                    }
                }
                let _ = c.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
            } else {
                let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\nConnection: close\r\n\r\n{\"status\":\"success\",\"data\":{\"resultType\":\"vec");
            }
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    });
    url
}

fn schedule(env: &TestEnv, url: &str) -> std::path::PathBuf {
    let web = env.path("web.yml");
    std::fs::write(
        &web,
        format!(
            "# receiver\nbasic_auth_users:\n  prom-reader: {}\n  writer-a: {}\n",
            bcrypt_hash("r"),
            bcrypt_hash(INITIAL_PW)
        ),
    )
    .unwrap();
    let o = env.rotd_stdin(
        &["import", "prom-remote-write", "--username", "writer-a"],
        &format!("{INITIAL_PW}\n"),
    );
    assert!(o.status.success());
    env.write_schedule(
        "prom-remote-write",
        &format!(
            "name = \"prom-remote-write\"\ngrace = \"0s\"\n[target]\nkind = \"prometheus-remote-write\"\nurl = \"{url}\"\nweb_config = \"{}\"\nusernames = [\"writer-a\", \"writer-b\"]\nbcrypt_cost = 4\n[probe]\nattempts = 3\ninterval = \"10ms\"\ntimeout = \"2s\"\n",
            web.display()
        ),
    );
    web
}

fn assert_clean_rollback(
    env: &TestEnv,
    web: &std::path::Path,
    before: &[u8],
    o: &std::process::Output,
    expect: &str,
) {
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(o), stderr(o));
    assert!(
        stdout(o).contains(expect),
        "expected {expect:?} in {}",
        stdout(o)
    );
    assert_eq!(
        std::fs::read(web).unwrap(),
        before,
        "web config restored byte for byte"
    );
    assert!(!env.head_files().iter().any(|f| f.ends_with(".pending.age")));
    assert_eq!(
        env.history_json(Some("prom-remote-write"))[0]["step"],
        "rolled-back"
    );
}

#[test]
fn a_query_answer_cut_off_mid_body_rolls_back() {
    let env = TestEnv::new();
    let web = schedule(&env, &truncating_receiver());
    let before = std::fs::read(&web).unwrap();
    let o = env.rotd(&["rotate", "prom-remote-write"]);
    assert_clean_rollback(&env, &web, &before, &o, "not Prometheus JSON");
}

#[test]
fn a_receiver_name_that_does_not_resolve_rolls_back() {
    let env = TestEnv::new();
    let web = schedule(&env, "http://rotd-probe-target.invalid:9090");
    let before = std::fs::read(&web).unwrap();
    let o = env.rotd(&["rotate", "prom-remote-write"]);
    assert_clean_rollback(
        &env,
        &web,
        &before,
        &o,
        "remote write to http://rotd-probe-target.invalid",
    );
}
