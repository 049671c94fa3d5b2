//! `meshctl policy list|trace` and the agent's policy status on a two-cluster `meshctl up`
//! mesh running the example policies (east: `shop/db-allow-web`, west:
//! `billing/invoices-allow-shop`).

use mesh_tests::meshctl::{MeshGuard, examples_dir, meshctl, text};
use serde_json::Value;

#[test]
fn policy_list_trace_and_status() {
    let guard = MeshGuard {
        dir: tempfile::Builder::new()
            .prefix("meshctl-policy-")
            .tempdir()
            .expect("temp dir"),
    };
    let dir = guard.dir.path().to_owned();
    let examples = examples_dir();
    let up = meshctl(
        &[
            "up",
            "--clusters",
            "2",
            "--examples",
            examples.to_str().expect("utf-8"),
        ],
        &dir,
    );
    assert!(up.status.success(), "meshctl up failed:\n{}", text(&up));

    // list: east's db endpoints are selected and default-deny for ingress; others are not.
    let l = meshctl(&["policy", "list", "--cluster", "east", "-o", "json"], &dir);
    assert!(l.status.success(), "policy list:\n{}", text(&l));
    let v: Value = serde_json::from_slice(&l.stdout).expect("json");
    let east = &v[0];
    assert_eq!(east["inForce"][0], "shop/db-allow-web", "{v:#}");
    let eps = east["endpoints"].as_array().expect("endpoints");
    for e in eps {
        let is_db = e["pod"].as_str().is_some_and(|p| p.starts_with("db-"));
        assert_eq!(e["defaultDenyIngress"], Value::Bool(is_db), "{e:#}");
        if is_db {
            assert_eq!(e["policies"][0], "shop/db-allow-web", "{e:#}");
            // web of east, web v1 and v2 of west, on 5432/TCP.
            assert_eq!(e["entries"], 3, "{e:#}");
        }
    }

    // trace: allowed with the rule named, denied with the selecting policy named; exit 0 / 2.
    let t = meshctl(
        &[
            "policy",
            "trace",
            "--from",
            "west/shop/app=web",
            "--to",
            "east/shop/db-0",
            "--port",
            "5432/TCP",
        ],
        &dir,
    );
    let out = String::from_utf8_lossy(&t.stdout);
    assert!(t.status.success(), "{}", text(&t));
    assert!(
        out.contains("ALLOWED") && out.contains("shop/db-allow-web ingress[0]"),
        "{out}"
    );
    for (from, port) in [
        ("west/shop/app=web", "5433/TCP"),
        ("west/shop/app=cart", "5432/TCP"),
    ] {
        let t = meshctl(
            &[
                "policy",
                "trace",
                "--from",
                from,
                "--to",
                "east/shop/db-0",
                "--port",
                port,
                "-o",
                "json",
            ],
            &dir,
        );
        assert_eq!(t.status.code(), Some(2), "{}", text(&t));
        let v: Value = serde_json::from_slice(&t.stdout).expect("json");
        assert_eq!(v["allowed"], Value::Bool(false), "{v:#}");
        assert_eq!(v["ingress"]["decision"], "default-deny", "{v:#}");
        assert_eq!(v["ingress"]["selectedBy"][0], "shop/db-allow-web", "{v:#}");
    }
    // A pod by name resolves to its identity's labels.
    let web_pod = eps
        .iter()
        .find_map(|e| e["pod"].as_str().filter(|p| p.starts_with("web-")))
        .expect("an east web pod")
        .to_owned();
    let t = meshctl(
        &[
            "policy",
            "trace",
            "--from",
            &format!("east/shop/{web_pod}"),
            "--to",
            "east/shop/db-1",
            "--port",
            "5432",
        ],
        &dir,
    );
    assert!(t.status.success(), "{}", text(&t));
    // Bad input is named.
    let t = meshctl(
        &[
            "policy",
            "trace",
            "--from",
            "east/shop/nope",
            "--to",
            "east/shop/db-1",
            "--port",
            "5432",
        ],
        &dir,
    );
    assert!(!t.status.success());
    assert!(
        String::from_utf8_lossy(&t.stderr).contains("no pod shop/nope"),
        "{}",
        text(&t)
    );
    let t = meshctl(
        &[
            "policy",
            "trace",
            "--from",
            "east/shop/app=web",
            "--to",
            "east/shop/db-1",
            "--port",
            "5432/ICMP",
        ],
        &dir,
    );
    assert!(
        String::from_utf8_lossy(&t.stderr).contains("is not TCP, UDP or SCTP"),
        "{}",
        text(&t)
    );

    // The agents report the policies they enforce.
    let st = meshctl(&["status", "-o", "json"], &dir);
    let v: Value = serde_json::from_slice(&st.stdout).expect("json");
    let east = &v["clusters"][0]["agent"];
    assert_eq!(east["policiesInForce"][0], "shop/db-allow-web", "{east:#}");
    assert_eq!(east["policyEntries"], 3, "{east:#}");
}
