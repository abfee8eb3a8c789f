//! Interoperability of `rotd::signing` with stock OpenSSH and git:
//! commits rotd signs pass `git verify-commit`, signatures pass
//! `ssh-keygen -Y verify`, and commits `git commit -S` signs pass
//! `rotd::signing::verify_commit`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use rotd::signing::{self, AllowedSigners, Error, Signer, VerifyError};

fn have(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// True when ssh-keygen and git are available; prints why a test is skipped otherwise.
fn tools_present(test: &str) -> bool {
    for (tool, arg) in [("ssh-keygen", "-?"), ("git", "--version")] {
        if !have(tool, arg) {
            eprintln!(
                "SKIPPED {test}: `{tool}` is not installed (on Debian: apt-get install -y openssh-client git)"
            );
            return false;
        }
    }
    true
}

fn keygen(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(args)
        .args(["-C", &format!("{name}@rotd.test"), "-f"])
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh-keygen");
    assert!(out.status.success(), "ssh-keygen failed: {out:?}");
    path
}

fn ed25519_key(dir: &Path, name: &str) -> PathBuf {
    keygen(dir, name, &["-q", "-t", "ed25519", "-N", ""])
}

fn pubkey(path: &Path) -> String {
    std::fs::read_to_string(path.with_extension("pub"))
        .expect("read .pub")
        .trim()
        .to_string()
}

/// Runs git in `repo` with no user or system configuration.
fn git(repo: &Path, home: &Path, args: &[&str]) -> Output {
    Command::new("git")
        .current_dir(repo)
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("LC_ALL", "C")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run git")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn write_tree(repo: &git2::Repository, name: &str, content: &[u8]) -> git2::Oid {
    let blob = repo.blob(content).expect("blob");
    let mut tb = repo.treebuilder(None).expect("treebuilder");
    tb.insert(name, blob, 0o100644).expect("insert");
    tb.write().expect("write tree")
}

#[test]
fn rotd_signed_commits_pass_stock_git() {
    if !tools_present("rotd_signed_commits_pass_stock_git") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let key = ed25519_key(dir, "rotd");
    let signer = Signer::from_file(&key).unwrap();
    assert_eq!(signer.public_key_openssh(), pubkey(&key));

    let allowed_path = dir.join("allowed_signers");
    std::fs::write(
        &allowed_path,
        format!(
            "# rotd signers\nrotd@example.com namespaces=\"git\" {}\n",
            signer.public_key_openssh()
        ),
    )
    .unwrap();
    let allowed = AllowedSigners::from_file(&allowed_path).unwrap();

    let repo_dir = dir.join("repo");
    let repo = git2::Repository::init(&repo_dir).unwrap();
    repo.set_head("refs/heads/main").unwrap();
    let who = git2::Signature::now("rotd", "rotd@example.com").unwrap();

    let t1 = repo.find_tree(write_tree(&repo, "a.age", b"one")).unwrap();
    let c1 = signing::commit(
        &repo,
        Some("HEAD"),
        &who,
        &who,
        "store: first secret\n",
        &t1,
        &[],
        Some(&signer),
    )
    .unwrap();
    let p1 = repo.find_commit(c1).unwrap();
    let t2 = repo.find_tree(write_tree(&repo, "a.age", b"two")).unwrap();
    let c2 = signing::commit(
        &repo,
        Some("HEAD"),
        &who,
        &who,
        "store: rotate secret\n\nWith a body.\n",
        &t2,
        &[&p1],
        Some(&signer),
    )
    .unwrap();
    assert_eq!(repo.head().unwrap().target(), Some(c2));

    let allowed_cfg = format!("gpg.ssh.allowedSignersFile={}", allowed_path.display());
    let base = ["-c", "gpg.format=ssh", "-c", &allowed_cfg];
    for rev in ["HEAD", "HEAD~1"] {
        let out = git(
            &repo_dir,
            dir,
            &[&base[..], &["verify-commit", "-v", rev]].concat(),
        );
        let t = text(&out);
        assert!(out.status.success(), "git verify-commit {rev} failed:\n{t}");
        assert!(t.contains("Good \"git\" signature"), "{t}");
        assert!(t.contains(&signer.fingerprint()), "{t}");
    }
    let out = git(
        &repo_dir,
        dir,
        &[&base[..], &["log", "--show-signature"]].concat(),
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert_eq!(
        t.matches("Good \"git\" signature for rotd@example.com")
            .count(),
        2,
        "{t}"
    );
    // The header has git's exact layout: continuation lines, no blank one.
    let out = git(&repo_dir, dir, &["cat-file", "commit", "HEAD"]);
    let raw = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        raw.contains("\ngpgsig -----BEGIN SSH SIGNATURE-----\n U1NIU0lH"),
        "{raw}"
    );
    assert!(
        raw.contains("\n -----END SSH SIGNATURE-----\n\nstore: rotate secret\n"),
        "{raw}"
    );
    // git's own object check is happy with the commits.
    let out = git(&repo_dir, dir, &["fsck", "--strict"]);
    assert!(out.status.success(), "{}", text(&out));

    for c in [c1, c2] {
        let v = signing::verify_commit(&repo, c, &allowed).unwrap().unwrap();
        assert_eq!(v.principal, "rotd@example.com");
        assert_eq!(v.fingerprint, signer.fingerprint());
    }
}

#[test]
fn ssh_keygen_accepts_sign_output() {
    if !tools_present("ssh_keygen_accepts_sign_output") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let key = ed25519_key(dir, "rotd");
    let signer = Signer::from_file(&key).unwrap();
    let allowed_path = dir.join("allowed_signers");
    std::fs::write(
        &allowed_path,
        format!("ops@example.com {}\n", signer.public_key_openssh()),
    )
    .unwrap();
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
    let sig_path = dir.join("data.sig");
    std::fs::write(&sig_path, signer.sign(&data).unwrap()).unwrap();
    let data_path = dir.join("data");
    std::fs::write(&data_path, &data).unwrap();

    let verify = |input: &Path| {
        Command::new("ssh-keygen")
            .args(["-Y", "verify", "-n", "git", "-I", "ops@example.com", "-f"])
            .arg(&allowed_path)
            .arg("-s")
            .arg(&sig_path)
            .stdin(std::fs::File::open(input).unwrap())
            .output()
            .unwrap()
    };
    let out = verify(&data_path);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("Good \"git\" signature"),
        "{}",
        text(&out)
    );

    std::fs::write(&data_path, b"changed").unwrap();
    assert!(!verify(&data_path).status.success());

    // And the reverse: a signature made by ssh-keygen verifies in rotd.
    let ssh_sign = |namespace: &str| {
        let input = dir.join(format!("input-{namespace}"));
        std::fs::write(&input, &data).unwrap();
        let out = Command::new("ssh-keygen")
            .args(["-Y", "sign", "-n", namespace, "-f"])
            .arg(&key)
            .arg(&input)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        std::fs::read_to_string(dir.join(format!("input-{namespace}.sig"))).unwrap()
    };
    let theirs = ssh_sign("git");
    let allowed = AllowedSigners::from_file(&allowed_path).unwrap();
    assert_eq!(
        allowed.verify(&data, &theirs).unwrap().principal,
        "ops@example.com"
    );
    let file_ns = ssh_sign("file");
    match allowed.verify(&data, &file_ns) {
        Err(VerifyError::WrongNamespace { found, .. }) => assert_eq!(found, "file"),
        other => panic!("expected WrongNamespace, got {other:?}"),
    }
}

#[test]
fn stock_git_signed_commits_verify_in_rotd() {
    if !tools_present("stock_git_signed_commits_verify_in_rotd") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let good = ed25519_key(dir, "good");
    let other = ed25519_key(dir, "other");
    let allowed = AllowedSigners::parse(&format!("dev@example.com {}\n", pubkey(&good))).unwrap();

    let repo_dir = dir.join("repo");
    let out = git(dir, dir, &["init", "-q", "-b", "main", "repo"]);
    assert!(out.status.success(), "{}", text(&out));
    let commit_with = |key: &Path, msg: &str| {
        let signing_key = format!("user.signingkey={}", key.display());
        let out = git(
            &repo_dir,
            dir,
            &[
                "-c",
                "user.name=Dev",
                "-c",
                "user.email=dev@example.com",
                "-c",
                "gpg.format=ssh",
                "-c",
                &signing_key,
                "commit",
                "-q",
                "-S",
                "--allow-empty",
                "-m",
                msg,
            ],
        );
        assert!(out.status.success(), "git commit -S failed: {}", text(&out));
        let repo = git2::Repository::open(&repo_dir).unwrap();
        let id = repo.head().unwrap().target().unwrap();
        id
    };
    let c_good = commit_with(&good, "signed by an allowed key");
    let c_other = commit_with(&other, "signed by another key");
    let out = git(
        &repo_dir,
        dir,
        &[
            "-c",
            "user.name=Dev",
            "-c",
            "user.email=dev@example.com",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "unsigned",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));

    let repo = git2::Repository::open(&repo_dir).unwrap();
    let c_unsigned = repo.head().unwrap().target().unwrap();
    let v = signing::verify_commit(&repo, c_good, &allowed)
        .unwrap()
        .unwrap();
    assert_eq!(v.principal, "dev@example.com");

    let other_signer_fpr = {
        let out = Command::new("ssh-keygen")
            .args(["-l", "-E", "sha256", "-f"])
            .arg(other.with_extension("pub"))
            .output()
            .unwrap();
        text(&out).split_whitespace().nth(1).unwrap().to_string()
    };
    match signing::verify_commit(&repo, c_other, &allowed) {
        Err(VerifyError::NotAllowed { fingerprint }) => assert_eq!(fingerprint, other_signer_fpr),
        other => panic!("expected NotAllowed, got {other:?}"),
    }
    assert!(signing::verify_commit(&repo, c_unsigned, &allowed)
        .unwrap()
        .is_none());

    // Our signer continues the history stock git started, and git agrees.
    let signer = Signer::from_file(&good).unwrap();
    let parent = repo.find_commit(c_unsigned).unwrap();
    let tree = parent.tree().unwrap();
    let who = git2::Signature::now("rotd", "rotd@example.com").unwrap();
    let c = signing::commit(
        &repo,
        Some("refs/heads/main"),
        &who,
        &who,
        "store: after git",
        &tree,
        &[&parent],
        Some(&signer),
    )
    .unwrap();
    assert_eq!(repo.refname_to_id("refs/heads/main").unwrap(), c);
    let allowed_path = dir.join("allowed");
    std::fs::write(
        &allowed_path,
        format!("dev@example.com {}\n", pubkey(&good)),
    )
    .unwrap();
    let allowed_cfg = format!("gpg.ssh.allowedSignersFile={}", allowed_path.display());
    let out = git(
        &repo_dir,
        dir,
        &[
            "-c",
            "gpg.format=ssh",
            "-c",
            &allowed_cfg,
            "verify-commit",
            "HEAD",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("Good \"git\" signature"));
}

#[test]
fn signer_refuses_encrypted_and_other_keys() {
    if !tools_present("signer_refuses_encrypted_and_other_keys") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let enc = keygen(dir, "enc", &["-q", "-t", "ed25519", "-N", "secret pass"]);
    match Signer::from_file(&enc) {
        Err(e @ Error::KeyEncrypted { .. }) => assert!(e.to_string().contains("passphrase")),
        other => panic!("expected KeyEncrypted, got {other:?}"),
    }
    let ecdsa = keygen(dir, "ecdsa", &["-q", "-t", "ecdsa", "-N", ""]);
    let rsa = keygen(dir, "rsa", &["-q", "-t", "rsa", "-b", "2048", "-N", ""]);
    for key in [&ecdsa, &rsa] {
        match Signer::from_file(key) {
            Err(e @ Error::KeyNotEd25519 { .. }) => assert!(e.to_string().contains("ed25519")),
            other => panic!(
                "expected KeyNotEd25519 for {}, got {other:?}",
                key.display()
            ),
        }
    }
    // An allowed signers file may list other key types alongside ed25519 ones.
    let ed = ed25519_key(dir, "ed");
    let list = format!(
        "a {}\nb {}\nc {}\n",
        pubkey(&ecdsa),
        pubkey(&rsa),
        pubkey(&ed)
    );
    let allowed = AllowedSigners::parse(&list).unwrap();
    assert_eq!(allowed.len(), 3);
    let signer = Signer::from_file(&ed).unwrap();
    let sig = signer.sign(b"x").unwrap();
    assert_eq!(allowed.verify(b"x", &sig).unwrap().principal, "c");
}
