//! Issuing and verifying bearer tokens (HS256 JWTs), and reading them from requests.
//!
//! A token carries exactly three claims: `sub` (the user id), `iat` and `exp` (seconds
//! since the Unix epoch). Verification accepts only HS256, requires `exp` and `sub`,
//! and allows [`LEEWAY_S`] seconds of clock skew between the issuer and this gateway.

use super::{AuthError, Secret};
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Clock skew tolerated when checking `exp`, in seconds.
pub const LEEWAY_S: u64 = 5;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    iat: u64,
    exp: u64,
}

fn now_s() -> u64 {
    // A clock before 1970 is a broken host; 0 then makes every token look expired
    // rather than panicking.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A token for `user`, valid for `ttl` from now, signed HS256 with `secret`.
///
/// ```
/// use keelson_ui_gateway::{Secret, issue_token, verify_token};
/// use std::time::Duration;
///
/// let secret = Secret::new("dev-secret").unwrap();
/// let token = issue_token(&secret, "alice", Duration::from_secs(60)).unwrap();
/// assert_eq!(verify_token(&secret, &token).unwrap(), "alice");
/// ```
pub fn issue_token(secret: &Secret, user: &str, ttl: Duration) -> Result<String, AuthError> {
    if user.is_empty() {
        return Err(AuthError::EmptySubject);
    }
    let iat = now_s();
    let claims = Claims {
        sub: user.to_owned(),
        iat,
        exp: iat.saturating_add(ttl.as_secs()),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(AuthError::Sign)
}

/// The user id (`sub`) of `token`, if it is an HS256 token signed with `secret`, not
/// expired, and has a non-empty subject.
pub fn verify_token(secret: &Secret, token: &str) -> Result<String, AuthError> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = LEEWAY_S;
    validation.validate_exp = true;
    validation.set_required_spec_claims(&["exp", "sub"]);
    let data = jsonwebtoken::decode::<Claims>(
        token,
        &DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .map_err(AuthError::InvalidToken)?;
    if data.claims.sub.is_empty() {
        return Err(AuthError::EmptySubject);
    }
    Ok(data.claims.sub)
}

/// The verified user of a request: `None` without an `Authorization` header, the
/// token's subject with a valid `Bearer` token, an error for anything else.
pub(crate) fn user_from_headers(
    secret: &Secret,
    headers: &HeaderMap,
) -> Result<Option<String>, AuthError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(AuthError::MalformedHeader(
            "more than one Authorization header",
        ));
    }
    let value = value
        .to_str()
        .map_err(|_| AuthError::MalformedHeader("not visible ASCII"))?;
    let (scheme, token) = value
        .trim()
        .split_once(' ')
        .ok_or(AuthError::MalformedHeader("expected `Bearer <token>`"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::MalformedHeader("not a Bearer token"));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::MalformedHeader("empty bearer token"));
    }
    verify_token(secret, token).map(Some)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn secret(s: &str) -> Secret {
        Secret::new(s).unwrap()
    }

    fn signed(secret: &str, claims: &serde_json::Value, alg: Algorithm) -> String {
        jsonwebtoken::encode(
            &Header::new(alg),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn round_trip() {
        let s = secret("k");
        let token = issue_token(&s, "alice", Duration::from_secs(60)).unwrap();
        assert_eq!(verify_token(&s, &token).unwrap(), "alice");
    }

    #[test]
    fn other_secret_is_refused() {
        let token = issue_token(&secret("a"), "alice", Duration::from_secs(60)).unwrap();
        assert!(matches!(
            verify_token(&secret("b"), &token),
            Err(AuthError::InvalidToken(_))
        ));
    }

    #[test]
    fn expired_beyond_leeway_is_refused_within_is_accepted() {
        let now = now_s();
        let old = serde_json::json!({"sub": "alice", "iat": now - 100, "exp": now - 60});
        let token = signed("k", &old, Algorithm::HS256);
        assert!(verify_token(&secret("k"), &token).is_err());
        let skewed = serde_json::json!({"sub": "alice", "iat": now - 100, "exp": now - 1});
        let token = signed("k", &skewed, Algorithm::HS256);
        assert_eq!(verify_token(&secret("k"), &token).unwrap(), "alice");
    }

    #[test]
    fn missing_exp_or_sub_and_empty_sub_are_refused() {
        let now = now_s();
        let no_exp = signed("k", &serde_json::json!({"sub": "a"}), Algorithm::HS256);
        assert!(verify_token(&secret("k"), &no_exp).is_err());
        let no_sub = signed("k", &serde_json::json!({"exp": now + 60}), Algorithm::HS256);
        assert!(verify_token(&secret("k"), &no_sub).is_err());
        let empty = serde_json::json!({"sub": "", "iat": now, "exp": now + 60});
        let empty = signed("k", &empty, Algorithm::HS256);
        assert!(verify_token(&secret("k"), &empty).is_err());
        assert!(issue_token(&secret("k"), "", Duration::from_secs(1)).is_err());
    }

    #[test]
    fn other_algorithm_is_refused() {
        let claims = serde_json::json!({"sub": "a", "exp": now_s() + 60});
        let token = signed("k", &claims, Algorithm::HS512);
        assert!(verify_token(&secret("k"), &token).is_err());
        assert!(verify_token(&secret("k"), "not.a.jwt").is_err());
        assert!(verify_token(&secret("k"), "").is_err());
    }

    #[test]
    fn headers() {
        let s = secret("k");
        let token = issue_token(&s, "bob", Duration::from_secs(60)).unwrap();
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            h
        };
        assert_eq!(user_from_headers(&s, &HeaderMap::new()).unwrap(), None);
        let bearer = with(&format!("Bearer {token}"));
        assert_eq!(
            user_from_headers(&s, &bearer).unwrap().as_deref(),
            Some("bob")
        );
        let lower = with(&format!("bearer {token}"));
        assert_eq!(
            user_from_headers(&s, &lower).unwrap().as_deref(),
            Some("bob")
        );
        for bad in [
            "Basic Ym9iOnB3",
            "Bearer",
            "Bearer   ",
            &token,
            "Bearer garbage",
        ] {
            assert!(user_from_headers(&s, &with(bad)).is_err(), "{bad}");
        }
        let mut twice = bearer.clone();
        twice.append(AUTHORIZATION, HeaderValue::from_str(&token).unwrap());
        assert!(user_from_headers(&s, &twice).is_err());
    }
}
