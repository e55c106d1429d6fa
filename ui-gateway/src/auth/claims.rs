//! The rules a verified token's claims must meet, each a distinct [`TokenRejection`].
//!
//! These run after the signature has been checked, so only a token's issuer can
//! learn from them which rule its token broke. Times are whole seconds since the Unix
//! epoch, and every comparison allows [`ClaimPolicy::leeway_s`] of clock skew.

use serde::Deserialize;

/// Longest `sub` (user id) accepted, in bytes.
pub const MAX_SUBJECT_BYTES: usize = 256;

/// Why a token was refused. The message names the rule; it is what the client sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenRejection {
    /// The token is longer than [`super::verifier::MAX_TOKEN_BYTES`].
    #[error("token too large")]
    TooLarge,
    /// Not three base64url parts, or a header or claims that are not JSON objects.
    #[error("token is not a well-formed JWT")]
    Malformed,
    /// `alg` is `none`, unknown, not in `auth.algorithms`, or has no key configured.
    #[error("algorithm not allowed")]
    AlgorithmNotAllowed,
    /// A JWKS is in use and the token's header has no `kid`.
    #[error("token has no key id (kid)")]
    MissingKeyId,
    /// No key in the JWKS has the token's `kid`.
    #[error("unknown key id")]
    UnknownKeyId,
    /// The key named by `kid` is for another algorithm than the token's `alg`.
    #[error("algorithm does not match the key")]
    AlgorithmKeyMismatch,
    /// The signature does not verify with the key.
    #[error("invalid signature")]
    BadSignature,
    /// No `exp` claim.
    #[error("token has no expiry (exp)")]
    MissingExpiry,
    /// `exp` is in the past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `exp` is further ahead than `auth.max_token_lifetime_s` (plus the leeway).
    #[error("token lifetime exceeds auth.max_token_lifetime_s")]
    LifetimeTooLong,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token not yet valid (nbf)")]
    NotYetValid,
    /// `iat` is in the future (beyond the leeway).
    #[error("token issued in the future (iat)")]
    IssuedInFuture,
    /// `iss` differs from `auth.issuer`.
    #[error("wrong issuer")]
    WrongIssuer,
    /// `aud` does not contain `auth.audience`.
    #[error("wrong audience")]
    WrongAudience,
    /// No `sub`, or an empty one.
    #[error("token has no subject (sub)")]
    MissingSubject,
    /// `sub` is longer than [`MAX_SUBJECT_BYTES`].
    #[error("sub too long")]
    SubjectTooLong,
    /// `sub` holds control, format (e.g. bidirectional overrides) or line/paragraph
    /// separator characters.
    #[error("sub contains control characters")]
    SubjectControlCharacters,
}

/// What the claims are checked against; built from [`super::AuthConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClaimPolicy {
    pub(crate) leeway_s: u64,
    pub(crate) max_lifetime_s: u64,
    pub(crate) issuer: Option<String>,
    pub(crate) audience: Option<String>,
}

/// The registered claims the gateway looks at. Times are `f64` because RFC 7519's
/// NumericDate may have a fraction; anything else (a string) makes the token malformed.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Claims {
    pub(crate) sub: Option<String>,
    pub(crate) exp: Option<f64>,
    pub(crate) nbf: Option<f64>,
    pub(crate) iat: Option<f64>,
    pub(crate) iss: Option<String>,
    pub(crate) aud: Option<Audience>,
}

/// `aud` is one string or an array of them (RFC 7519 §4.1.3).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn contains(&self, wanted: &str) -> bool {
        match self {
            Audience::One(a) => a == wanted,
            Audience::Many(all) => all.iter().any(|a| a == wanted),
        }
    }
}

/// The user id of `claims` if they meet `policy` at `now_s`.
pub(crate) fn check(
    claims: Claims,
    policy: &ClaimPolicy,
    now_s: u64,
) -> Result<String, TokenRejection> {
    use TokenRejection as R;
    // Float seconds: a year-9999 `exp` or a fractional one compares correctly, and
    // nothing here can overflow.
    let now = now_s as f64;
    let leeway = policy.leeway_s as f64;
    let exp = claims.exp.ok_or(R::MissingExpiry)?;
    if exp + leeway < now {
        return Err(R::Expired);
    }
    if exp > now + policy.max_lifetime_s as f64 + leeway {
        return Err(R::LifetimeTooLong);
    }
    if claims.nbf.is_some_and(|nbf| nbf > now + leeway) {
        return Err(R::NotYetValid);
    }
    if claims.iat.is_some_and(|iat| iat > now + leeway) {
        return Err(R::IssuedInFuture);
    }
    if let Some(issuer) = &policy.issuer
        && claims.iss.as_deref() != Some(issuer.as_str())
    {
        return Err(R::WrongIssuer);
    }
    if let Some(audience) = &policy.audience
        && !claims
            .aud
            .as_ref()
            .is_some_and(|aud| aud.contains(audience))
    {
        return Err(R::WrongAudience);
    }
    let sub = claims.sub.ok_or(R::MissingSubject)?;
    check_subject(&sub)?;
    Ok(sub)
}

/// Whether `sub` is acceptable as a user id: non-empty, at most [`MAX_SUBJECT_BYTES`],
/// and free of characters that would let it hide or disguise itself in logs and UIs.
pub(crate) fn check_subject(sub: &str) -> Result<(), TokenRejection> {
    if sub.is_empty() {
        return Err(TokenRejection::MissingSubject);
    }
    if sub.len() > MAX_SUBJECT_BYTES {
        return Err(TokenRejection::SubjectTooLong);
    }
    if sub.chars().any(is_control_or_format) {
        return Err(TokenRejection::SubjectControlCharacters);
    }
    Ok(())
}

/// Unicode general categories Cc (control), Cf (format: bidirectional overrides and
/// isolates, zero-width characters, the BOM, tags...) and Zl/Zp (line and paragraph
/// separators), as of Unicode 16. Written out rather than pulling a Unicode-tables
/// crate for one predicate; a format character added in a later Unicode version is
/// not refused until this list is updated.
fn is_control_or_format(c: char) -> bool {
    matches!(
        c,
        '\u{0}'..='\u{1F}'
            | '\u{7F}'..='\u{9F}'
            | '\u{AD}'
            | '\u{600}'..='\u{605}'
            | '\u{61C}'
            | '\u{6DD}'
            | '\u{70F}'
            | '\u{890}'..='\u{891}'
            | '\u{8E2}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{110BD}'
            | '\u{110CD}'
            | '\u{13430}'..='\u{1343F}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0001}'
            | '\u{E0020}'..='\u{E007F}'
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use TokenRejection as R;

    const NOW: u64 = 1_700_000_000;

    fn policy() -> ClaimPolicy {
        ClaimPolicy {
            leeway_s: 30,
            max_lifetime_s: 3600,
            issuer: None,
            audience: None,
        }
    }

    fn claims(value: serde_json::Value) -> Claims {
        serde_json::from_value(value).unwrap()
    }

    fn run(value: serde_json::Value, policy: &ClaimPolicy) -> Result<String, R> {
        check(claims(value), policy, NOW)
    }

    #[test]
    fn a_plain_valid_token_gives_its_subject() {
        let ok = serde_json::json!({"sub": "alice", "iat": NOW, "exp": NOW + 60});
        assert_eq!(run(ok, &policy()).unwrap(), "alice");
    }

    #[test]
    fn exp_is_required_and_bounded_both_ways_with_leeway() {
        let p = policy();
        let at = |exp: f64| run(serde_json::json!({"sub": "a", "exp": exp}), &p);
        assert_eq!(
            run(serde_json::json!({"sub": "a"}), &p),
            Err(R::MissingExpiry)
        );
        let now = NOW as f64;
        assert_eq!(at(now - 31.0), Err(R::Expired));
        assert!(at(now - 30.0).is_ok(), "within the leeway");
        assert!(at(now + 3630.0).is_ok(), "max lifetime plus leeway");
        assert_eq!(at(now + 3631.0), Err(R::LifetimeTooLong));
        assert_eq!(at(now + 100.0 * 365.0 * 86400.0), Err(R::LifetimeTooLong));
        assert_eq!(at(1e300), Err(R::LifetimeTooLong));
        assert!(at(now + 0.5).is_ok(), "fractional NumericDate");
    }

    #[test]
    fn nbf_and_iat_in_the_future_are_refused_beyond_the_leeway() {
        let p = policy();
        let with = |key: &str, t: u64| {
            let mut v = serde_json::json!({"sub": "a", "exp": NOW + 60});
            v[key] = t.into();
            run(v, &p)
        };
        assert_eq!(with("nbf", NOW + 31), Err(R::NotYetValid));
        assert!(with("nbf", NOW + 30).is_ok());
        assert!(with("nbf", NOW - 1000).is_ok());
        assert_eq!(with("iat", NOW + 31), Err(R::IssuedInFuture));
        assert!(with("iat", NOW + 30).is_ok());
    }

    #[test]
    fn issuer_and_audience_are_checked_only_when_configured() {
        let p = ClaimPolicy {
            issuer: Some("https://idp.example".into()),
            audience: Some("keelson".into()),
            ..policy()
        };
        let base = |iss: serde_json::Value, aud: serde_json::Value| serde_json::json!({"sub": "a", "exp": NOW + 60, "iss": iss, "aud": aud});
        assert!(run(base("https://idp.example".into(), "keelson".into()), &p).is_ok());
        let many = serde_json::json!(["other", "keelson"]);
        assert!(run(base("https://idp.example".into(), many), &p).is_ok());
        assert_eq!(
            run(base("https://evil.example".into(), "keelson".into()), &p),
            Err(R::WrongIssuer)
        );
        let no_iss = serde_json::json!({"sub": "a", "exp": NOW + 60, "aud": "keelson"});
        assert_eq!(run(no_iss, &p), Err(R::WrongIssuer));
        assert_eq!(
            run(base("https://idp.example".into(), "other".into()), &p),
            Err(R::WrongAudience)
        );
        let no_aud = serde_json::json!({"sub": "a", "exp": NOW + 60, "iss": "https://idp.example"});
        assert_eq!(run(no_aud, &p), Err(R::WrongAudience));
        // Unconfigured: whatever the token says is fine.
        assert!(run(base("anyone".into(), "anything".into()), &policy()).is_ok());
    }

    #[test]
    fn subject_rules() {
        assert_eq!(check_subject(""), Err(R::MissingSubject));
        assert!(check_subject(&"x".repeat(MAX_SUBJECT_BYTES)).is_ok());
        assert_eq!(
            check_subject(&"x".repeat(MAX_SUBJECT_BYTES + 1)),
            Err(R::SubjectTooLong)
        );
        // 128 two-byte characters are 256 bytes: the bound is on bytes.
        assert!(check_subject(&"é".repeat(128)).is_ok());
        assert_eq!(check_subject(&"é".repeat(129)), Err(R::SubjectTooLong));
        for bad in [
            "a\0b",
            "a\nb",
            "tab\t",
            "\u{7F}",
            "\u{85}",
            "admin\u{202E}nimda",
            "\u{200E}a",
            "\u{200F}a",
            "\u{2066}a",
            "\u{2069}a",
            "zero\u{200B}width",
            "\u{FEFF}bom",
            "\u{2028}",
            "tag\u{E0041}",
        ] {
            assert_eq!(
                check_subject(bad),
                Err(R::SubjectControlCharacters),
                "{bad:?}"
            );
        }
        for good in [
            "alice",
            "user@example.com",
            "Zoë",
            "用户",
            "a b",
            "emoji 🚀",
        ] {
            assert!(check_subject(good).is_ok(), "{good:?}");
        }
        let missing = serde_json::json!({"exp": NOW + 60});
        assert_eq!(run(missing, &policy()), Err(R::MissingSubject));
    }
}
