//! `meshctl certs` end to end through `meshd::ctl::run`: init, issue, inspect, verification and expiry flags.

use std::path::Path;

use clap::Parser;
use meshd::ctl::{Cli, CtlError, Status, run};

/// Parses `args` (without the program name) and runs them, returning the outcome and the output.
fn meshctl(args: &[&str]) -> (Result<Status, CtlError>, String) {
    let cli = Cli::try_parse_from(std::iter::once("meshctl").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("parse {args:?}: {e}"));
    let mut out = Vec::new();
    let res = run(&cli, &mut out);
    (res, String::from_utf8(out).expect("utf-8 output"))
}

fn ok(args: &[&str]) -> String {
    let (res, out) = meshctl(args);
    match res {
        Ok(Status::Ok) => out,
        other => panic!("meshctl {args:?}: {other:?}\n{out}"),
    }
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

fn init(dir: &Path, cluster: &str) -> String {
    ok(&["certs", "init", "--dir", p(dir), "--cluster", cluster])
}

#[test]
fn init_issue_inspect_verifies_and_shows_sans() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = init(dir, "east");
    assert!(
        out.contains("ca.crt") && out.contains("CN=meshd-east-ca"),
        "{out}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let out = ok(&[
        "certs",
        "issue",
        "--dir",
        p(dir),
        "--name",
        "apiserver",
        "--cn",
        "apiserver-east",
        "--dns",
        "localhost,apiserver.east",
        "--ip",
        "127.0.0.1,::1",
        "--usage",
        "both",
    ]);
    assert!(
        out.contains("apiserver.crt") && out.contains("DNS:apiserver.east"),
        "{out}"
    );
    ok(&[
        "certs",
        "issue",
        "--dir",
        p(dir),
        "--name",
        "remote-west",
        "--cn",
        "remote-west",
        "--usage",
        "client",
        "--validity",
        "90d",
    ]);

    let server = dir.join("apiserver.crt");
    let client = dir.join("remote-west.crt");
    let ca = dir.join("ca.crt");
    let out = ok(&[
        "certs",
        "inspect",
        p(&server),
        p(&client),
        p(&ca),
        "--ca",
        p(&ca),
    ]);
    assert_eq!(out.matches("chain:").count(), 3, "{out}");
    assert_eq!(out.matches("OK (verified against").count(), 3, "{out}");
    for needle in [
        "CN=apiserver-east",
        "DNS:localhost",
        "DNS:apiserver.east",
        "IP:127.0.0.1",
        "IP:::1",
        "serverAuth, clientAuth",
        "CN=remote-west",
        "CN=meshd-east-ca",
        "3 certificate(s) checked, 0 with problems",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in\n{out}");
    }
}

#[test]
fn init_twice_refuses_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    init(dir, "east");
    let before = std::fs::read_to_string(dir.join("ca.crt")).unwrap();

    let (res, _) = meshctl(&["certs", "init", "--dir", p(dir), "--cluster", "east"]);
    let err = res.expect_err("second init must refuse");
    assert!(matches!(err, CtlError::CaExists { .. }), "{err:?}");
    assert!(err.to_string().contains("ca.crt") && err.to_string().contains("--force"));
    assert_eq!(std::fs::read_to_string(dir.join("ca.crt")).unwrap(), before);

    ok(&[
        "certs",
        "init",
        "--dir",
        p(dir),
        "--cluster",
        "east",
        "--force",
    ]);
    assert_ne!(std::fs::read_to_string(dir.join("ca.crt")).unwrap(), before);
}

#[test]
fn issue_errors_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // No CA yet: the error names the missing file.
    let (res, _) = meshctl(&[
        "certs",
        "issue",
        "--dir",
        p(dir),
        "--name",
        "x",
        "--cn",
        "x",
    ]);
    let err = res.expect_err("no CA");
    assert!(matches!(err, CtlError::CaMissing { .. }), "{err:?}");
    assert!(err.to_string().contains(p(&dir.join("ca.crt"))), "{err}");

    init(dir, "east");
    let (res, _) = meshctl(&[
        "certs",
        "issue",
        "--dir",
        p(dir),
        "--name",
        "x",
        "--cn",
        "x",
        "--ip",
        "127.0.0.1,198.18.0.300",
    ]);
    let err = res.expect_err("bad IP");
    assert!(matches!(err, CtlError::InvalidIp { .. }), "{err:?}");
    assert!(err.to_string().contains("198.18.0.300"), "{err}");
    assert!(!dir.join("x.crt").exists());

    // Malformed validity is rejected while parsing, naming the value.
    let err = Cli::try_parse_from([
        "meshctl",
        "certs",
        "issue",
        "--dir",
        p(dir),
        "--name",
        "x",
        "--cn",
        "x",
        "--validity",
        "12 parsecs",
    ])
    .expect_err("bad validity");
    assert!(err.to_string().contains("12 parsecs"), "{err}");

    // Refuses to overwrite the CA through --name ca.
    let (res, _) = meshctl(&[
        "certs",
        "issue",
        "--dir",
        p(dir),
        "--name",
        "ca",
        "--cn",
        "x",
    ]);
    assert!(
        matches!(res, Err(CtlError::InvalidArg { flag: "--name", .. })),
        "{res:?}"
    );
}

#[test]
fn inspect_against_another_ca_fails_verification() {
    let tmp = tempfile::tempdir().unwrap();
    let east = tmp.path().join("east");
    let west = tmp.path().join("west");
    init(&east, "east");
    init(&west, "west");
    ok(&[
        "certs",
        "issue",
        "--dir",
        p(&west),
        "--name",
        "srv",
        "--cn",
        "srv",
        "--dns",
        "srv",
    ]);

    let (res, out) = meshctl(&[
        "certs",
        "inspect",
        p(&west.join("srv.crt")),
        "--ca",
        p(&east.join("ca.crt")),
    ]);
    let status = res.expect("inspect runs");
    assert_eq!(status, Status::Problems);
    assert_eq!(status.exit_code(), 2);
    assert!(out.contains("FAILED against"), "{out}");
    assert!(out.contains("VERIFY FAILED"), "{out}");
    assert!(out.contains("meshd-west-ca"), "{out}");
}

#[test]
fn expiring_soon_is_flagged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    init(dir, "east");
    ok(&[
        "certs",
        "issue",
        "--dir",
        p(dir),
        "--name",
        "short",
        "--cn",
        "short",
        "--usage",
        "client",
        "--validity",
        "1d",
    ]);
    let crt = dir.join("short.crt");
    let (res, out) = meshctl(&[
        "certs",
        "inspect",
        p(&crt),
        "--ca",
        p(&dir.join("ca.crt")),
        "--warn-within",
        "30d",
    ]);
    assert_eq!(res.expect("inspect runs"), Status::Problems, "{out}");
    assert!(
        out.contains("EXPIRES SOON") && out.contains("within 30d"),
        "{out}"
    );
    assert!(
        out.contains("OK (verified against"),
        "chain itself is fine: {out}"
    );

    // A narrower window than the remaining lifetime is fine.
    let out = ok(&["certs", "inspect", p(&crt), "--warn-within", "1h"]);
    assert!(out.contains("not checked (no --ca)"), "{out}");
}

#[test]
fn json_output_parses() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    init(dir, "east");
    ok(&[
        "certs",
        "issue",
        "--dir",
        p(dir),
        "--name",
        "srv",
        "--cn",
        "srv",
        "--ip",
        "127.0.0.1",
    ]);
    let out = ok(&[
        "certs",
        "inspect",
        p(&dir.join("srv.crt")),
        "--ca",
        p(&dir.join("ca.crt")),
        "-o",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["problems"], 0);
    assert_eq!(v["warn_within_days"], 30);
    let cert = &v["certificates"][0];
    assert_eq!(cert["subject_cn"], "srv");
    assert_eq!(cert["issuer"], "CN=meshd-east-ca");
    assert_eq!(cert["ip_addresses"][0], "127.0.0.1");
    assert_eq!(cert["is_ca"], false);
    assert_eq!(cert["extended_key_usage"][0], "serverAuth");
    assert_eq!(cert["chain"]["ok"], true);
    assert!(
        cert["remaining_days"]
            .as_i64()
            .is_some_and(|d| (363..=365).contains(&d))
    );
    assert!(cert["problems"].as_array().is_some_and(Vec::is_empty));
}

#[test]
fn inspect_missing_file_and_version() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope.crt");
    let (res, _) = meshctl(&["certs", "inspect", p(&missing)]);
    let err = res.expect_err("missing file");
    assert!(err.to_string().contains("nope.crt"), "{err}");

    assert!(ok(&["version"]).starts_with("meshctl "));
}

#[test]
fn issue_with_a_role_and_reissue_role_less_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    init(dir, "east");
    // --role: the cluster comes from the CA's CN meshd-east-ca.
    let out = ok(&[
        "certs",
        "issue",
        "--dir",
        p(dir),
        "--name",
        "root",
        "--cn",
        "root",
        "--usage",
        "client",
        "--role",
        "admin",
    ]);
    assert!(out.contains("URI:spiffe://east.meshd/admin"), "{out}");
    let out = ok(&[
        "certs",
        "issue",
        "--dir",
        p(dir),
        "--name",
        "remote-west",
        "--cn",
        "remote-west",
        "--usage",
        "client",
        "--role",
        "peer",
        "--cluster",
        "other",
    ]);
    assert!(out.contains("URI:spiffe://other.meshd/peer"), "{out}");
    let e = Cli::try_parse_from([
        "meshctl",
        "certs",
        "issue",
        "--dir",
        p(dir),
        "--name",
        "x",
        "--cn",
        "x",
        "--role",
        "root",
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("admin, agent, apiserver, peer"), "{e}");
    // Without --role, a client certificate gets a note (and no role).
    let out = ok(&[
        "certs",
        "issue",
        "--dir",
        p(dir),
        "--name",
        "agent",
        "--cn",
        "agent-east",
        "--usage",
        "client",
    ]);
    assert!(
        out.contains("no --role") && out.contains("--role agent?"),
        "{out}"
    );
    let out = ok(&["certs", "inspect", p(&dir.join("agent.crt"))]);
    assert!(out.contains("none (the gRPC APIs refuse it)"), "{out}");

    // reissue: dry run changes nothing; then the role-less agent cert gets role agent.
    let out = ok(&["certs", "reissue", "--dir", p(dir), "--dry-run"]);
    assert!(
        out.contains("would reissue") && out.contains("role agent"),
        "{out}"
    );
    let out = ok(&["certs", "inspect", p(&dir.join("agent.crt"))]);
    assert!(out.contains("none (the gRPC APIs refuse it)"), "{out}");
    let out = ok(&["certs", "reissue", "--dir", p(dir)]);
    assert!(
        out.contains("reissued") && out.contains("CN=agent-east") && out.contains("role agent"),
        "{out}"
    );
    assert!(
        out.contains("kept") && out.contains("spiffe://east.meshd/admin"),
        "{out}"
    );
    let out = ok(&[
        "certs",
        "inspect",
        p(&dir.join("agent.crt")),
        "--ca",
        p(&dir.join("ca.crt")),
        "-o",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let cert = &v["certificates"][0];
    assert_eq!(cert["role"], "spiffe://east.meshd/agent");
    assert_eq!(cert["subject_cn"], "agent-east");
    assert_eq!(cert["extended_key_usage"][0], "clientAuth");
    assert_eq!(cert["chain"]["ok"], true);
    let out = ok(&["certs", "reissue", "--dir", p(dir)]);
    assert!(!out.contains("reissued"), "idempotent: {out}");
}
