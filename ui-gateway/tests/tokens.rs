//! Token verification as a client sees it: real HTTP against a gateway that accepts
//! HS256 tokens with the shared secret and RS256/ES256 tokens with keys from a JWKS
//! file, with an issuer and an audience configured. Every refusal is a 401
//! `invalid_token` whose message names the rule.
//!
//! The private keys in `fixtures/` are test-only keys made with `openssl` (RSA
//! PKCS#1 DER, EC P-256 PKCS#8 DER); their public halves are derived here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use keelson_ui_gateway::{
    AuthConfig, GatewayConfig, MISS_RELOAD_INTERVAL, Secret, TokenVerifier, issue_token_for,
};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::{Mesh, SECRET, json_of};

const ISSUER: &str = "https://idp.test";
const AUDIENCE: &str = "keelson-test";

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A signing key of the test issuer.
struct Key {
    kid: &'static str,
    alg: Algorithm,
    encoding: EncodingKey,
}

impl Key {
    fn rsa(file: &str, kid: &'static str) -> Self {
        Self {
            kid,
            alg: Algorithm::RS256,
            encoding: EncodingKey::from_rsa_der(&fixture(file)),
        }
    }

    fn ec(file: &str, kid: &'static str) -> Self {
        Self {
            kid,
            alg: Algorithm::ES256,
            encoding: EncodingKey::from_ec_der(&fixture(file)),
        }
    }

    fn jwk(&self) -> Jwk {
        let mut jwk = Jwk::from_encoding_key(&self.encoding, self.alg).unwrap();
        jwk.common.key_id = Some(self.kid.to_owned());
        jwk
    }

    /// `claims` signed with this key, the header naming `kid`.
    fn sign_as(&self, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }

    fn sign(&self, claims: &Value) -> String {
        self.sign_as(Some(self.kid), claims)
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims that pass every rule, for `sub`.
fn good_claims(sub: &str) -> Value {
    let now = now_s();
    json!({"sub": sub, "iat": now, "exp": now + 600, "iss": ISSUER, "aud": AUDIENCE})
}

fn write_jwks(path: &Path, keys: &[&Key]) {
    let set = JwkSet {
        keys: keys.iter().map(|k| k.jwk()).collect(),
    };
    // Written whole and renamed into place, as a rotation tool would.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&set).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A gateway trusting `keys` through a JWKS file, and the shared secret.
struct Fixture {
    mesh: Mesh,
    jwks: PathBuf,
    config: AuthConfig,
    _dir: tempfile::TempDir,
}

async fn gateway_trusting(keys: &[&Key]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, keys);
    let config = AuthConfig {
        secret: Some(SECRET.to_owned()),
        issuer: Some(ISSUER.to_owned()),
        audience: Some(AUDIENCE.to_owned()),
        max_token_lifetime_s: 3600,
        token_ttl_s: 3600,
        jwks_file: Some(jwks.clone()),
        ..AuthConfig::default()
    };
    let verifier = TokenVerifier::from_config(&config).unwrap();
    let mesh = Mesh::with_verifier(GatewayConfig::default(), verifier).await;
    Fixture {
        mesh,
        jwks,
        config,
        _dir: dir,
    }
}

async fn call(mesh: &Mesh, token: &str) -> reqwest::Response {
    mesh.post("whoami", "{}")
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// The user the gateway passed on for `token`, failing on anything but 200.
async fn user_of(mesh: &Mesh, token: &str) -> Value {
    let response = call(mesh, token).await;
    assert_eq!(response.status(), 200);
    json_of(response).await["user"].clone()
}

/// The 401 message for `token`, failing unless the body is the usual error shape.
async fn refusal(mesh: &Mesh, token: &str) -> String {
    let response = call(mesh, token).await;
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body = json_of(response).await;
    assert_eq!(body["error"]["code"], "invalid_token", "{body}");
    body["error"]["message"].as_str().unwrap().to_owned()
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

#[tokio::test]
async fn valid_rs256_es256_and_hs256_tokens_are_accepted() {
    let rsa = Key::rsa("rsa-1.der", "rsa-1");
    let ec = Key::ec("ec-p256-1.der", "ec-1");
    let f = gateway_trusting(&[&rsa, &ec]).await;
    assert_eq!(
        user_of(&f.mesh, &rsa.sign(&good_claims("alice"))).await,
        "alice"
    );
    assert_eq!(user_of(&f.mesh, &ec.sign(&good_claims("bob"))).await, "bob");
    let secret = Secret::new(SECRET).unwrap();
    let hs = issue_token_for(&f.config, &secret, "carol", Duration::from_secs(60)).unwrap();
    assert_eq!(user_of(&f.mesh, &hs).await, "carol");
    // `aud` as an array holding ours is fine too.
    let many = with(good_claims("dave"), "aud", json!(["other", AUDIENCE]));
    assert_eq!(user_of(&f.mesh, &rsa.sign(&many)).await, "dave");
}

#[tokio::test]
async fn every_broken_rule_is_a_401_naming_it() {
    let rsa = Key::rsa("rsa-1.der", "rsa-1");
    let ec = Key::ec("ec-p256-1.der", "ec-1");
    let stranger = Key::rsa("rsa-2.der", "rsa-2");
    let f = gateway_trusting(&[&rsa, &ec]).await;
    let now = now_s();
    let good = good_claims("alice");
    let none = {
        use base64::Engine as _;
        let b64 =
            |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&good)
        )
    };
    let hs_with_public_key = {
        // The classic confusion: HS256 "signed" with the RSA public key as secret.
        let public = serde_json::to_vec(&rsa.jwk()).unwrap();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("rsa-1".into());
        jsonwebtoken::encode(&header, &good, &EncodingKey::from_secret(&public)).unwrap()
    };
    let century = now + 100 * 365 * 86_400;
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "100-year exp",
            rsa.sign(&with(good.clone(), "exp", century.into())),
            "token lifetime exceeds auth.max_token_lifetime_s",
        ),
        (
            "missing exp",
            rsa.sign(&without(good.clone(), "exp")),
            "token has no expiry (exp)",
        ),
        (
            "expired",
            rsa.sign(&with(good.clone(), "exp", (now - 3600).into())),
            "token expired",
        ),
        (
            "future nbf",
            rsa.sign(&with(good.clone(), "nbf", (now + 600).into())),
            "token not yet valid (nbf)",
        ),
        (
            "future iat",
            rsa.sign(&with(good.clone(), "iat", (now + 600).into())),
            "token issued in the future (iat)",
        ),
        (
            "100 kB sub",
            rsa.sign(&good_claims(&"x".repeat(100_000))),
            "token too large",
        ),
        (
            "257-byte sub",
            rsa.sign(&good_claims(&"x".repeat(257))),
            "sub too long",
        ),
        (
            "sub with NUL",
            rsa.sign(&good_claims("ali\0ce")),
            "sub contains control characters",
        ),
        (
            "sub with U+202E",
            rsa.sign(&good_claims("admin\u{202E}nimda")),
            "sub contains control characters",
        ),
        (
            "empty sub",
            rsa.sign(&good_claims("")),
            "token has no subject (sub)",
        ),
        (
            "wrong iss",
            rsa.sign(&with(good.clone(), "iss", "https://evil.test".into())),
            "wrong issuer",
        ),
        (
            "wrong aud",
            rsa.sign(&with(good.clone(), "aud", "someone-else".into())),
            "wrong audience",
        ),
        (
            "unknown kid",
            rsa.sign_as(Some("nobody"), &good),
            "unknown key id",
        ),
        (
            "no kid",
            rsa.sign_as(None, &good),
            "token has no key id (kid)",
        ),
        ("alg none", none, "algorithm not allowed"),
        (
            "RS256 by a key not in the JWKS",
            stranger.sign_as(Some("rsa-1"), &good),
            "invalid signature",
        ),
        (
            "ES256 naming an RSA key",
            ec.sign_as(Some("rsa-1"), &good),
            "algorithm does not match the key",
        ),
        (
            "HS256 signed with the public key",
            hs_with_public_key,
            "invalid signature",
        ),
    ];
    for (case, token, rule) in cases {
        let message = refusal(&f.mesh, &token).await;
        assert_eq!(message, format!("invalid bearer token: {rule}"), "{case}");
    }
}

#[tokio::test]
async fn hs256_is_refused_when_not_among_the_algorithms() {
    let rsa = Key::rsa("rsa-1.der", "rsa-1");
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[&rsa]);
    let config = AuthConfig {
        algorithms: vec![keelson_ui_gateway::TokenAlgorithm::RS256],
        jwks_file: Some(jwks),
        ..AuthConfig::default()
    };
    // No secret configured, and none needed.
    let verifier = TokenVerifier::from_config(&config).unwrap();
    let mesh = Mesh::with_verifier(GatewayConfig::default(), verifier).await;
    let now = now_s();
    let claims = json!({"sub": "alice", "exp": now + 60});
    assert_eq!(user_of(&mesh, &rsa.sign(&claims)).await, "alice");
    let hs = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(
        refusal(&mesh, &hs).await,
        "invalid bearer token: algorithm not allowed"
    );
}

#[tokio::test]
async fn a_rotated_jwks_file_is_picked_up_without_a_restart() {
    let old = Key::rsa("rsa-1.der", "2024-old");
    let new = Key::rsa("rsa-2.der", "2025-new");
    let f = gateway_trusting(&[&old]).await;
    let by_new = new.sign(&good_claims("alice"));
    assert_eq!(
        refusal(&f.mesh, &by_new).await,
        "invalid bearer token: unknown key id"
    );

    write_jwks(&f.jwks, &[&new]);
    // An unknown kid reloads the file at most once per MISS_RELOAD_INTERVAL, so the
    // new key is accepted within about that long; poll for it, bounded.
    let begun = Instant::now();
    loop {
        let response = call(&f.mesh, &by_new).await;
        if response.status() == 200 {
            assert_eq!(json_of(response).await["user"], "alice");
            break;
        }
        assert_eq!(response.status(), 401);
        assert!(
            begun.elapsed() < MISS_RELOAD_INTERVAL * 5,
            "the rotated key was not picked up in {:?}",
            begun.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The retired key is gone with the same reload.
    assert_eq!(
        refusal(&f.mesh, &old.sign(&good_claims("alice"))).await,
        "invalid bearer token: unknown key id"
    );
}
