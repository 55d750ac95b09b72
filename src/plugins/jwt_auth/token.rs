//! A JWS compact token, read and checked by portcullis itself before any crypto.
//!
//! jsonwebtoken's `decode` applies its own claim rules (required `exp`, 60 s leeway,
//! `nbf` ignored) and its own error order; APISIX's differ. So the token is split and
//! its header and payload decoded here, once, with APISIX's checks in APISIX's
//! order, and only the signature goes to jsonwebtoken's crypto
//! (`jsonwebtoken::crypto::verify`) with the credential's pre-built key.
//!
//! Everything a client controls is bounded first: the token's length (before any
//! decoding), its segment count, strict base64url, JSON objects only.
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};

use super::Credential;

/// Tokens longer than this are refused before anything is decoded. Real tokens are a
/// few hundred bytes; RS512 with many claims stays under 2 KiB.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// A token split and decoded, signature not yet checked.
#[derive(Debug)]
pub struct Token<'a> {
    pub header: Map<String, Value>,
    pub payload: Map<String, Value>,
    /// `base64url(header) "." base64url(payload)`, what the signature covers.
    pub signing_input: &'a str,
    pub signature: &'a str,
}

impl<'a> Token<'a> {
    /// Splits and decodes `raw`. The error is the reason for the log; the client only
    /// ever hears "JWT token invalid".
    pub fn parse(raw: &'a str) -> Result<Self, String> {
        if raw.len() > MAX_TOKEN_LEN {
            return Err(format!(
                "token of {} bytes exceeds the {MAX_TOKEN_LEN} byte limit",
                raw.len()
            ));
        }
        let segments = raw.bytes().filter(|&b| b == b'.').count() + 1;
        if segments != 3 {
            return Err(match segments {
                5 => "5 segments: JWE tokens are not supported".to_string(),
                n => format!("invalid jwt string: {n} segments, expected 3"),
            });
        }
        let mut parts = raw.splitn(3, '.');
        let (Some(header), Some(payload), Some(signature)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err("invalid jwt string".into());
        };
        let header_obj = decode_object(header).map_err(|e| format!("invalid header: {e}"))?;
        let payload_obj = decode_object(payload).map_err(|e| format!("invalid payload: {e}"))?;
        Ok(Token {
            header: header_obj,
            payload: payload_obj,
            signing_input: &raw[..header.len() + 1 + payload.len()],
            signature,
        })
    }

    /// The header's `alg`, when it is a string.
    pub fn alg(&self) -> Option<&str> {
        self.header.get("alg").and_then(Value::as_str)
    }
}

fn decode_object(segment: &str) -> Result<Map<String, Value>, String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|e| format!("not base64url: {e}"))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err("not a JSON object".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

/// Which registered claims to check, as `claims_to_verify` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimRule {
    /// `claims_to_verify` unset or empty: `exp` and `nbf` are checked when present.
    WhenPresent,
    /// The listed claims must be present and valid.
    Required(Vec<Claim>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    Exp,
    Nbf,
}

impl Claim {
    pub fn name(self) -> &'static str {
        match self {
            Claim::Exp => "exp",
            Claim::Nbf => "nbf",
        }
    }
}

/// Checks the signature and the claims against `cred`, in APISIX's order: the
/// header's `alg` must equal the credential's algorithm exactly, then the signature,
/// then the claims. Any error is "failed to verify jwt" for the client.
pub fn verify(
    token: &Token<'_>,
    cred: &Credential,
    rule: &ClaimRule,
    now: i64,
) -> Result<(), String> {
    match token.alg() {
        Some(alg) if alg == cred.algorithm_name => {}
        other => {
            return Err(format!(
                "algorithm mismatch, expected {}, token has {}",
                cred.algorithm_name,
                other.map_or_else(|| "no string alg".to_string(), |a| format!("{a:?}"))
            ));
        }
    }
    // A token that declares extensions it requires must be understood: portcullis
    // implements none. (`jwk`, `jku`, `x5u`, `x5c` are simply never read.)
    if token.header.contains_key("crit") {
        return Err("the token header lists critical extensions (crit), none are supported".into());
    }
    if token.signature.is_empty() {
        return Err("empty signature".into());
    }
    match cred
        .key
        .verify(token.signature, token.signing_input.as_bytes())
    {
        Ok(true) => {}
        Ok(false) => return Err("signature mismatch".into()),
        Err(e) => return Err(format!("signature not verifiable: {e}")),
    }
    check_claims(&token.payload, rule, cred.lifetime_grace_period, now)
}

/// APISIX's claim rules: numbers only, strict boundaries, the credential's grace
/// period as the only leeway.
pub fn check_claims(
    payload: &Map<String, Value>,
    rule: &ClaimRule,
    grace: u64,
    now: i64,
) -> Result<(), String> {
    let (claims, required): (&[Claim], bool) = match rule {
        ClaimRule::WhenPresent => (&[Claim::Nbf, Claim::Exp], false),
        ClaimRule::Required(list) => (list, true),
    };
    let grace = grace as f64;
    let now = now as f64;
    for &claim in claims {
        let Some(value) = payload.get(claim.name()) else {
            if required {
                return Err(format!("claim {} is missing", claim.name()));
            }
            continue;
        };
        let Some(at) = value.as_f64() else {
            return Err(format!("claim {} is not a number", claim.name()));
        };
        match claim {
            Claim::Exp if at <= now - grace => return Err(format!("'exp' claim expired at {at}")),
            Claim::Nbf if at >= now + grace => {
                return Err(format!("'nbf' claim not valid until {at}"));
            }
            _ => {}
        }
    }
    Ok(())
}
