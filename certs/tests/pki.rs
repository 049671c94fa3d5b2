//! CA generation, issuance, inspection, chain verification and file round trips (no TLS).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use mesh_certs::{
    CertError, CertRequest, CertUsage, CertificateAuthority, Principal, Role, RoleError,
    inspect_pem, verify_chain,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use time::OffsetDateTime;

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn assert_close(actual: OffsetDateTime, expected: OffsetDateTime, what: &str) {
    let diff = (actual - expected).abs();
    assert!(
        diff < time::Duration::minutes(10),
        "{what}: {actual} is not within 10 minutes of {expected}"
    );
}

#[test]
fn generate_issue_inspect_verify() {
    let ca = CertificateAuthority::generate("meshd-ca-east", 10 * DAY).unwrap();
    let server = ca
        .issue(&CertRequest::server(
            "apiserver-east",
            &["localhost"],
            &[LOCALHOST],
        ))
        .unwrap();
    let client = ca.issue(&CertRequest::client("remote-west")).unwrap();
    let now = OffsetDateTime::now_utc();

    // CA
    let ca_info = inspect_pem(ca.cert_pem()).unwrap();
    assert_eq!(ca_info.len(), 1);
    let ca_info = &ca_info[0];
    assert_eq!(ca_info, ca.info());
    assert_eq!(ca_info.subject_cn.as_deref(), Some("meshd-ca-east"));
    assert_eq!(ca_info.subject, "CN=meshd-ca-east");
    assert_eq!(ca_info.issuer, "CN=meshd-ca-east");
    assert!(ca_info.is_ca);
    assert!(ca_info.key_usage.contains(&"keyCertSign".to_owned()));
    assert!(ca_info.key_usage.contains(&"cRLSign".to_owned()));
    assert_close(ca_info.not_after, now + 10 * DAY, "CA notAfter");
    assert!(ca_info.not_before <= now);
    assert!(ca_info.is_valid_now());

    // server leaf
    let s = inspect_pem(&server.cert_pem).unwrap().remove(0);
    assert_eq!(s, server.info().unwrap());
    assert_eq!(s.subject_cn.as_deref(), Some("apiserver-east"));
    assert_eq!(s.issuer, "CN=meshd-ca-east");
    assert_eq!(s.dns_names, vec!["localhost".to_owned()]);
    assert_eq!(s.ip_addresses, vec![LOCALHOST]);
    assert!(!s.is_ca);
    assert_eq!(s.extended_key_usage, vec!["serverAuth".to_owned()]);
    assert_eq!(
        s.key_usage,
        vec!["digitalSignature".to_owned(), "keyEncipherment".to_owned()]
    );
    assert_close(s.not_after, now + 365 * DAY, "server notAfter");
    assert!(!s.expires_within(300 * DAY));
    assert!(s.expires_within(400 * DAY));
    assert_eq!(s.serial_hex.len(), 32, "16-byte random serial");
    assert_ne!(s.serial_hex, ca_info.serial_hex);

    // client leaf
    let c = inspect_pem(&client.cert_pem).unwrap().remove(0);
    assert_eq!(c.subject_cn.as_deref(), Some("remote-west"));
    assert_eq!(c.subject, "CN=remote-west");
    assert!(c.dns_names.is_empty() && c.ip_addresses.is_empty());
    assert!(!c.is_ca);
    assert_eq!(c.extended_key_usage, vec!["clientAuth".to_owned()]);

    // both + a bundle
    let both = ca
        .issue(&CertRequest::server_and_client(
            "etcd-east",
            &["localhost"],
            &[],
        ))
        .unwrap();
    let b = both.info().unwrap();
    assert_eq!(
        b.extended_key_usage,
        vec!["serverAuth".to_owned(), "clientAuth".to_owned()]
    );
    let bundle = format!("{}{}", server.cert_pem, ca.cert_pem());
    let infos = inspect_pem(&bundle).unwrap();
    assert_eq!(infos.len(), 2);
    assert!(!infos[0].is_ca && infos[1].is_ca);

    // chain verification
    verify_chain(&server.cert_pem, ca.cert_pem()).unwrap();
    verify_chain(&client.cert_pem, ca.cert_pem()).unwrap();

    // another CA with another name: the issuer check fails
    let west = CertificateAuthority::generate("meshd-ca-west", 10 * DAY).unwrap();
    let err = verify_chain(&server.cert_pem, west.cert_pem()).unwrap_err();
    assert!(
        matches!(err, CertError::VerifyIssuer { .. }),
        "unexpected error: {err}"
    );
    assert!(err.to_string().contains("verify issuer"), "{err}");

    // another CA with the same name: the signature check fails
    let impostor = CertificateAuthority::generate("meshd-ca-east", 10 * DAY).unwrap();
    let err = verify_chain(&client.cert_pem, impostor.cert_pem()).unwrap_err();
    assert!(
        matches!(err, CertError::VerifySignature { .. }),
        "unexpected error: {err}"
    );
    assert!(err.to_string().contains("verify signature"), "{err}");
    assert!(std::error::Error::source(&err).is_some());

    // a bundle holding the impostor first and the real CA second still verifies
    let ca_bundle = format!("{}{}", impostor.cert_pem(), ca.cert_pem());
    verify_chain(&client.cert_pem, &ca_bundle).unwrap();

    // a leaf used as "CA": issuer name does not match (its subject is the leaf's own CN)
    let err = verify_chain(&client.cert_pem, &server.cert_pem).unwrap_err();
    assert!(matches!(err, CertError::VerifyIssuer { .. }), "{err}");
}

#[test]
fn expired_and_not_yet_valid_certificates_fail_validity_check() {
    let ca = CertificateAuthority::generate("meshd-ca-east", 10 * DAY).unwrap();
    let now = OffsetDateTime::now_utc();

    let expired = ca
        .issue(
            &CertRequest::client("remote-west")
                .with_not_before(now - 2 * DAY)
                .with_validity(DAY),
        )
        .unwrap();
    let info = expired.info().unwrap();
    assert_close(info.not_before, now - 2 * DAY, "expired notBefore");
    assert_close(info.not_after, now - DAY, "expired notAfter");
    assert!(info.expires_within(Duration::ZERO));
    assert!(!info.is_valid_now());
    let err = verify_chain(&expired.cert_pem, ca.cert_pem()).unwrap_err();
    match &err {
        CertError::VerifyValidity { which, .. } => assert_eq!(*which, "leaf"),
        other => panic!("expected a validity error, got {other}"),
    }
    assert!(err.to_string().contains("verify validity"), "{err}");

    let future = ca
        .issue(
            &CertRequest::server("apiserver-east", &["localhost"], &[])
                .with_not_before(now + DAY)
                .with_validity(DAY),
        )
        .unwrap();
    let err = verify_chain(&future.cert_pem, ca.cert_pem()).unwrap_err();
    assert!(matches!(err, CertError::VerifyValidity { .. }), "{err}");

    // in the middle of its validity the leaf passes, and then the CA (created just now) fails
    let err = mesh_certs::verify_chain_at(&expired.cert_pem, ca.cert_pem(), now - DAY - DAY / 2)
        .unwrap_err();
    match &err {
        CertError::VerifyValidity { which, .. } => assert_eq!(*which, "CA"),
        other => panic!("expected a CA validity error, got {other}"),
    }
}

#[test]
fn ca_round_trips_through_pem_and_files() {
    let ca = CertificateAuthority::generate("meshd-ca-east", 30 * DAY).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (crt, key) = ca.write_files(&dir.path().join("pki"), "ca").unwrap();
    assert_eq!(crt, dir.path().join("pki/ca.crt"));
    assert_eq!(key, dir.path().join("pki/ca.key"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "CA key mode");
    }

    let loaded = CertificateAuthority::from_files(&crt, &key).unwrap();
    assert_eq!(loaded.cert_pem(), ca.cert_pem());
    assert_eq!(loaded.info(), ca.info());
    let leaf = loaded
        .issue(&CertRequest::client("root").with_usage(CertUsage::Client))
        .unwrap();
    // a certificate issued by the reloaded CA verifies against the original CA certificate
    verify_chain(&leaf.cert_pem, ca.cert_pem()).unwrap();

    let from_pem = CertificateAuthority::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
    verify_chain(
        &from_pem
            .issue(&CertRequest::client("apiserver-east"))
            .unwrap()
            .cert_pem,
        ca.cert_pem(),
    )
    .unwrap();

    let (leaf_crt, leaf_key) = leaf.write_files(dir.path(), "root").unwrap();
    assert_eq!(std::fs::read_to_string(&leaf_crt).unwrap(), leaf.cert_pem);
    assert_eq!(std::fs::read_to_string(&leaf_key).unwrap(), leaf.key_pem);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&leaf_key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "leaf key mode");
    }
    // no temp files left behind
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp.")), "{names:?}");

    // load_or_generate: loads what is there, generates what is not
    let again =
        CertificateAuthority::load_or_generate(&dir.path().join("pki"), "ca", "ignored", DAY)
            .unwrap();
    assert_eq!(again.cert_pem(), ca.cert_pem());
    let fresh = CertificateAuthority::load_or_generate(
        &dir.path().join("pki"),
        "west",
        "meshd-ca-west",
        DAY,
    )
    .unwrap();
    assert_eq!(fresh.info().subject_cn.as_deref(), Some("meshd-ca-west"));
    assert!(dir.path().join("pki/west.key").exists());
}

#[test]
fn bad_inputs_give_named_errors_not_panics() {
    let ca = CertificateAuthority::generate("meshd-ca-east", 30 * DAY).unwrap();
    let other = CertificateAuthority::generate("meshd-ca-west", 30 * DAY).unwrap();
    let leaf = ca.issue(&CertRequest::client("remote-west")).unwrap();

    // key of another CA
    let err = CertificateAuthority::from_pem(ca.cert_pem(), other.key_pem()).unwrap_err();
    assert!(matches!(err, CertError::Invalid { .. }), "{err}");
    assert!(err.to_string().contains("does not belong"), "{err}");

    // a leaf is not a CA
    let err = CertificateAuthority::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
    assert!(err.to_string().contains("not a CA"), "{err}");

    // garbage
    let err = inspect_pem("hello").unwrap_err();
    assert!(matches!(err, CertError::NoCertificate { .. }), "{err}");
    let err =
        inspect_pem("-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n").unwrap_err();
    assert!(matches!(err, CertError::ParsePem { .. }), "{err}");
    let err =
        inspect_pem("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap_err();
    assert!(matches!(err, CertError::ParseCert { .. }), "{err}");
    let err = CertificateAuthority::from_pem(ca.cert_pem(), "not a key").unwrap_err();
    assert!(matches!(err, CertError::ParseKey { .. }), "{err}");
    let err = verify_chain("", ca.cert_pem()).unwrap_err();
    assert!(matches!(err, CertError::NoCertificate { .. }), "{err}");

    // missing files name the path
    let missing = std::path::Path::new("/nonexistent/mesh-certs/ca.crt");
    let err = CertificateAuthority::from_files(missing, missing).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/mesh-certs/ca.crt"),
        "{err}"
    );

    // bad requests
    let err = ca.issue(&CertRequest::client("")).unwrap_err();
    assert!(matches!(err, CertError::Request { .. }), "{err}");
    let err = ca
        .issue(&CertRequest::client("x").with_validity(Duration::from_secs(u64::MAX)))
        .unwrap_err();
    assert!(matches!(err, CertError::Request { .. }), "{err}");
    let err = ca
        .issue(&CertRequest::server("x", &["bad name é"], &[]))
        .unwrap_err();
    assert!(matches!(err, CertError::Sign { .. }), "{err}");

    // Debug never shows key material
    for dbg in [format!("{ca:?}"), format!("{leaf:?}")] {
        assert!(!dbg.contains("PRIVATE KEY"), "{dbg}");
        assert!(dbg.contains("redacted"), "{dbg}");
    }
}

/// The role SAN is issued as a URI SAN next to DNS/IP SANs and read back from the DER
/// certificate (what the gRPC servers do with a TLS peer certificate) and from `CertInfo`.
#[test]
fn role_sans_are_issued_and_read_back() {
    let ca = CertificateAuthority::generate("meshd-east-ca", DAY).unwrap();
    let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    for role in Role::ALL {
        let issued = ca
            .issue(&CertRequest::client("x").with_role("east", role))
            .unwrap();
        let info = issued.info().unwrap();
        assert_eq!(info.uris, [format!("spiffe://east.meshd/{role}")]);
        assert_eq!(info.principal().unwrap(), Principal::new("east", role));
        let p = Principal::from_der(&der(&issued.cert_pem)).unwrap();
        assert_eq!((p.cluster(), p.role()), ("east", role));
        verify_chain(&issued.cert_pem, ca.cert_pem()).unwrap();
    }

    // A server certificate keeps its DNS/IP SANs next to the role.
    let server = ca
        .issue(
            &CertRequest::server("mesh-agent", &["localhost"], &[LOCALHOST])
                .with_role("east", Role::Agent),
        )
        .unwrap();
    let info = server.info().unwrap();
    assert_eq!(info.dns_names, ["localhost"]);
    assert_eq!(info.ip_addresses, [LOCALHOST]);
    assert_eq!(info.principal().unwrap().role(), Role::Agent);

    // Without a role: Missing, naming the subject.
    let plain = ca.issue(&CertRequest::client("root")).unwrap();
    assert!(plain.info().unwrap().uris.is_empty());
    let e = Principal::from_der(&der(&plain.cert_pem)).unwrap_err();
    assert!(matches!(e, RoleError::Missing { .. }), "{e}");
    assert!(e.to_string().contains("CN=root"), "{e}");

    // A cluster name that cannot be a trust domain is refused at issue time.
    let e = ca
        .issue(&CertRequest::client("x").with_role("East/1", Role::Admin))
        .unwrap_err();
    assert!(matches!(e, CertError::Request { .. }), "{e}");
    assert!(e.to_string().contains("East/1"), "{e}");

    // Garbage is a parse error, not a panic.
    let e = Principal::from_der(b"not a certificate").unwrap_err();
    assert!(matches!(e, RoleError::Parse { .. }), "{e}");
}

#[test]
fn public_types_are_send_and_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<CertError>();
    check::<CertificateAuthority>();
    check::<mesh_certs::IssuedCert>();
    check::<mesh_certs::ReloadingCertKey>();
    check::<mesh_certs::CertInfo>();
    check::<Principal>();
    check::<RoleError>();
}
