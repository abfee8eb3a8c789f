//! Generates rotd's man pages and shell completions into a directory, for packaging:
//! `cargo run --example gen-docs -- target/docs`.
//!
//! `rotd(1)` and the completions come from the clap definitions (`rotd::cli::Cli`);
//! `rotd.toml(5)` from the table of settings below, which mirrors the README's
//! configuration reference.

use std::io::Write;
use std::path::PathBuf;

use clap::CommandFactory;

const TOML_SETTINGS: &[(&str, &str, &str)] = &[
    ("[store] path", "git work tree of the store", "required"),
    (
        "[store] identity",
        "the daemon's age identity; refused if group or others can read it",
        "required",
    ),
    (
        "[store] recipients",
        "file of age1... / ssh-ed25519 ... lines; every secret is encrypted to them and the daemon",
        "none",
    ),
    (
        "[store] remote",
        "pushed after every commit; the pending push is the compare-and-swap between instances",
        "none",
    ),
    (
        "[store] remote_ssh_key, remote_token_file",
        "credentials for an ssh:// or https:// remote",
        "none",
    ),
    (
        "[store] remote_known_hosts",
        "OpenSSH known_hosts file the SSH server's host key must be listed in, checked at every connection",
        "libgit2's check of $HOME/.ssh/known_hosts",
    ),
    ("[store] branch", "branch name", "main"),
    (
        "[store] signing_key",
        "OpenSSH ed25519 private key; every commit is SSH-signed",
        "none",
    ),
    (
        "[store] author_name, author_email",
        "commit author",
        "rotd, rotd@localhost",
    ),
    (
        "[daemon] schedules",
        "directory of NAME.toml files, one secret each, hot-reloaded",
        "schedules/ beside rotd.toml",
    ),
    (
        "[daemon] socket",
        "control socket, mode 0660",
        "/run/rotd/rotd.sock",
    ),
    (
        "[daemon] socket_group",
        "group owning the socket",
        "rotd when it exists",
    ),
    (
        "[daemon] allowed_uids",
        "uids allowed on the socket besides root and the daemon",
        "[]",
    ),
    (
        "[daemon] metrics",
        "address:port of /metrics and /healthz",
        "off",
    ),
    (
        "[daemon] shutdown_grace",
        "how long SIGTERM waits for rotations in flight",
        "60s",
    ),
    (
        "name",
        "secret name; the schedule file must be NAME.toml",
        "required",
    ),
    (
        "schedule",
        "cron with seconds: sec min hour day month weekday",
        "manual only",
    ),
    (
        "jitter, grace",
        "random delay per run; how long the old credential stays valid",
        "0s, 15m",
    ),
    (
        "window, max_age",
        "daily UTC window HH:MM-HH:MM; rotate at start-up when older",
        "none",
    ),
    (
        "retries, retry_backoff",
        "scheduled retries after a failure, doubling backoff",
        "3, 1m",
    ),
    (
        "[generate] length, charset",
        "16-4096 characters of base64url, hex, alnum or ascii",
        "32, base64url",
    ),
    (
        "[target] kind",
        "prometheus-remote-write, elasticsearch-api-key or files",
        "required",
    ),
    (
        "[target] url, web_config, usernames, query_credential, bcrypt_cost",
        "prometheus-remote-write settings",
        "",
    ),
    (
        "[target] url, ca, admin_credential, expiration, [[target.permissions]]",
        "elasticsearch-api-key settings",
        "",
    ),
    (
        "[[deliver]] path, content | template, mode, reload",
        "render a consumer file atomically, then reload (http_post, signal + pidfile, exec)",
        "mode 0600",
    ),
    (
        "[probe] timeout, attempts, interval, http, index",
        "bounds of the probe; generic HTTP probe; Elasticsearch data stream",
        "10s, 10, 500ms",
    ),
];

fn roff_escape(s: &str) -> String {
    s.replace('\\', "\\e").replace('-', "\\-")
}

fn main() -> std::io::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/docs".into()),
    );
    std::fs::create_dir_all(out.join("man"))?;
    std::fs::create_dir_all(out.join("completions"))?;
    let cmd = rotd::cli::Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    std::fs::write(out.join("man/rotd.1"), page)?;

    let mut m = std::fs::File::create(out.join("man/rotd.toml.5"))?;
    writeln!(
        m,
        ".TH ROTD.TOML 5 \"\" \"rotd {}\" \"File Formats\"",
        env!("CARGO_PKG_VERSION")
    )?;
    writeln!(
        m,
        ".SH NAME\nrotd.toml \\- configuration of the rotd secret\\-rotation daemon"
    )?;
    writeln!(m, ".SH DESCRIPTION\n/etc/rotd/rotd.toml holds [store] and [daemon]; each file in the schedules directory describes one secret: its schedule, generator, target, consumers ([[deliver]]) and probe. Relative paths are taken relative to the file's directory. Unknown keys are errors; \\fBrotd check\\fR reports every problem with file and line.")?;
    writeln!(m, ".SH SETTINGS")?;
    for (key, what, default) in TOML_SETTINGS {
        writeln!(
            m,
            ".TP\n.B {}\n{}{}",
            roff_escape(key),
            roff_escape(what),
            if default.is_empty() {
                String::new()
            } else {
                format!(" (default: {})", roff_escape(default))
            }
        )?;
    }
    writeln!(m, ".SH PLACEHOLDERS\n{{{{secret}}}} {{{{username}}}} {{{{key_id}}}} {{{{encoded}}}} {{{{name}}}} {{{{rotation_id}}}} in [[deliver]] content and templates; only the non\\-secret ones in paths.")?;
    writeln!(m, ".SH SEE ALSO\n.BR rotd (1)")?;

    let mut cmd = cmd;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd, "rotd", out.join("completions"))?;
    }
    println!("wrote man pages and completions to {}", out.display());
    Ok(())
}
