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
//!
//! Only the members a decision reads are kept (`alg`, whether `crit` is present, the
//! key claim, `exp`, `nbf`); every other member is parsed (the JSON must be valid)
//! but not stored. Building a whole `serde_json::Map` of header and payload was most
//! of an HS256 Check's cost; the full payload is kept only for `store_in_ctx`. A
//! member repeated in one object keeps its last value, as a map would.
use std::borrow::Cow;
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};

use super::Credential;

/// Tokens longer than this are refused before anything is decoded. Real tokens are a
/// few hundred bytes; RS512 with many claims stays under 2 KiB.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Segments whose decoded form fits are decoded on the stack (every real header and
/// almost every payload): no allocation for the base64 step.
const STACK_DECODE: usize = 1024;

/// A token split and decoded, signature not yet checked.
#[derive(Debug)]
pub struct Token<'a> {
    /// The header's `alg`, when it is a string.
    pub alg: Option<String>,
    /// Whether the header has a `crit` member (whatever its value).
    pub crit: bool,
    pub claims: Claims,
    /// `base64url(header) "." base64url(payload)`, what the signature covers.
    pub signing_input: &'a str,
    pub signature: &'a str,
}

/// The payload members a decision reads.
#[derive(Debug, Default)]
pub struct Claims {
    /// The plugin's `key_claim_name` member: it names the credential.
    pub key: Option<Value>,
    pub exp: Option<Value>,
    pub nbf: Option<Value>,
    /// The whole payload, only when asked for (`store_in_ctx`).
    pub all: Option<Map<String, Value>>,
}

impl Claims {
    /// The members of an already parsed payload.
    pub fn from_map(map: Map<String, Value>, key_claim: &str) -> Self {
        Claims {
            key: map.get(key_claim).cloned(),
            exp: map.get("exp").cloned(),
            nbf: map.get("nbf").cloned(),
            all: Some(map),
        }
    }

    fn get(&self, claim: Claim) -> Option<&Value> {
        match claim {
            Claim::Exp => self.exp.as_ref(),
            Claim::Nbf => self.nbf.as_ref(),
        }
    }
}

impl<'a> Token<'a> {
    /// Splits and decodes `raw`, keeping the `key_claim` member of the payload, and
    /// the whole payload when `keep_payload`. The error is the reason for the log; the
    /// client only ever hears "JWT token invalid".
    pub fn parse(raw: &'a str, key_claim: &str, keep_payload: bool) -> Result<Self, String> {
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
        let (alg, crit) = decode_segment(header, |json| {
            let seed = Picker {
                names: ["alg", "crit", ""],
                keep: false,
            };
            let [alg, crit, _] = parse_object(json, seed)?.picked;
            Ok((
                match alg {
                    Some(Value::String(alg)) => Some(alg),
                    _ => None,
                },
                crit.is_some(),
            ))
        })
        .map_err(|e| format!("invalid header: {e}"))?;
        let claims = decode_segment(payload, |json| {
            let seed = Picker {
                names: [key_claim, "exp", "nbf"],
                keep: keep_payload,
            };
            let Picked {
                picked: [key, exp, nbf],
                all,
            } = parse_object(json, seed)?;
            Ok(Claims { key, exp, nbf, all })
        })
        .map_err(|e| format!("invalid payload: {e}"))?;
        Ok(Token {
            alg,
            crit,
            claims,
            signing_input: &raw[..header.len() + 1 + payload.len()],
            signature,
        })
    }

    /// The header's `alg`, when it is a string.
    pub fn alg(&self) -> Option<&str> {
        self.alg.as_deref()
    }
}

/// The members `names` of a token segment's JSON object (base64url), every other
/// member parsed but not kept: what the openid-connect bearer path reads of a header.
pub(crate) fn segment_members<const N: usize>(
    segment: &str,
    names: [&str; N],
) -> Result<[Option<Value>; N], String> {
    decode_segment(segment, |json| {
        Ok(parse_object(json, Picker { names, keep: false })?.picked)
    })
}

/// Decodes a base64url segment and hands the bytes to `f`.
fn decode_segment<T>(
    segment: &str,
    f: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Result<T, String> {
    let not_base64 = |e: base64::DecodeSliceError| format!("not base64url: {e}");
    // The decoded length is at most 3/4 of the segment.
    if segment.len() / 4 * 3 + 3 <= STACK_DECODE {
        let mut buf = [0u8; STACK_DECODE];
        let n = URL_SAFE_NO_PAD
            .decode_slice(segment, &mut buf)
            .map_err(not_base64)?;
        f(&buf[..n])
    } else {
        let bytes = URL_SAFE_NO_PAD
            .decode(segment)
            .map_err(|e| format!("not base64url: {e}"))?;
        f(&bytes)
    }
}

fn parse_object<const N: usize>(json: &[u8], seed: Picker<'_, N>) -> Result<Picked<N>, String> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let picked = seed.deserialize(&mut de).map_err(|e| {
        if e.is_data() {
            "not a JSON object".to_string()
        } else {
            format!("not JSON: {e}")
        }
    })?;
    de.end().map_err(|e| format!("not JSON: {e}"))?;
    Ok(picked)
}

/// Reads a JSON object, keeping the values of `names` (an empty name matches no
/// member) and, with `keep`, the whole object.
struct Picker<'n, const N: usize> {
    names: [&'n str; N],
    keep: bool,
}

struct Picked<const N: usize> {
    picked: [Option<Value>; N],
    all: Option<Map<String, Value>>,
}

impl<'de, const N: usize> DeserializeSeed<'de> for Picker<'_, N> {
    type Value = Picked<N>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Picked<N>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, const N: usize> Visitor<'de> for Picker<'_, N> {
    type Value = Picked<N>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Picked<N>, A::Error> {
        let mut picked: [Option<Value>; N] = std::array::from_fn(|_| None);
        if self.keep {
            let mut all = Map::new();
            while let Some((name, value)) = map.next_entry::<String, Value>()? {
                all.insert(name, value);
            }
            for (slot, name) in picked.iter_mut().zip(self.names) {
                *slot = all.get(name).filter(|_| !name.is_empty()).cloned();
            }
            return Ok(Picked {
                picked,
                all: Some(all),
            });
        }
        while let Some(MemberName(name)) = map.next_key()? {
            match self.names.iter().position(|n| !n.is_empty() && *n == name) {
                Some(i) => {
                    let value = map.next_value::<Value>()?;
                    // Several names may be the same member (key_claim_name "exp").
                    for (slot, n) in picked.iter_mut().zip(self.names).skip(i + 1) {
                        if n == name {
                            *slot = Some(value.clone());
                        }
                    }
                    picked[i] = Some(value);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Picked { picked, all: None })
    }
}

/// An object member's name, borrowed from the input unless it has escapes.
struct MemberName<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for MemberName<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MemberName<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(MemberName(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(MemberName(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(MemberName(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
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

/// Whether the signature still has to be checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signature {
    Unchecked,
    /// This exact token verified with this exact key before (`plugins::verified`).
    AlreadyVerified,
}

/// Checks the signature and the claims against `cred`, in APISIX's order: the
/// header's `alg` must equal the credential's algorithm exactly, then the signature,
/// then the claims. Any error is "failed to verify jwt" for the client.
pub fn verify(
    token: &Token<'_>,
    cred: &Credential,
    rule: &ClaimRule,
    now: i64,
    signature: Signature,
) -> Result<(), String> {
    match token.alg() {
        Some(alg) if Some(alg) == cred.algorithm_name() => {}
        other => {
            return Err(format!(
                "algorithm mismatch, expected {}, token has {}",
                cred.algorithm_name().unwrap_or("?"),
                other.map_or_else(|| "no string alg".to_string(), |a| format!("{a:?}"))
            ));
        }
    }
    // A token that declares extensions it requires must be understood: portcullis
    // implements none. (`jwk`, `jku`, `x5u`, `x5c` are simply never read.)
    if token.crit {
        return Err("the token header lists critical extensions (crit), none are supported".into());
    }
    if token.signature.is_empty() {
        return Err("empty signature".into());
    }
    if signature == Signature::AlreadyVerified {
        return check_claims(&token.claims, rule, cred.lifetime_grace_period, now);
    }
    match cred
        .key
        .verify(token.signature, token.signing_input.as_bytes())
    {
        Ok(true) => {}
        Ok(false) => return Err("signature mismatch".into()),
        Err(e) => return Err(format!("signature not verifiable: {e}")),
    }
    check_claims(&token.claims, rule, cred.lifetime_grace_period, now)
}

/// APISIX's claim rules: numbers only, strict boundaries, the credential's grace
/// period as the only leeway.
pub fn check_claims(
    payload: &Claims,
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
        let Some(value) = payload.get(claim) else {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn token(header: &Value, payload: &str) -> String {
        format!(
            "{}.{}.sig",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(payload)
        )
    }

    #[test]
    fn only_the_members_a_decision_reads_are_kept() {
        let t = token(
            &json!({"alg": "HS256", "typ": "JWT", "kid": {"x": [1, 2]}}),
            r#"{"key":"k","exp":5,"nbf":1,"other":[{"deep":true}]}"#,
        );
        let parsed = Token::parse(&t, "key", false).unwrap();
        assert_eq!(parsed.alg(), Some("HS256"));
        assert!(!parsed.crit);
        assert_eq!(parsed.claims.key, Some(json!("k")));
        assert_eq!(parsed.claims.exp, Some(json!(5)));
        assert_eq!(parsed.claims.nbf, Some(json!(1)));
        assert!(parsed.claims.all.is_none());

        let kept = Token::parse(&t, "key", true).unwrap();
        assert_eq!(kept.claims.all.unwrap()["other"], json!([{"deep": true}]));
    }

    #[test]
    fn a_repeated_member_keeps_its_last_value_and_names_may_coincide() {
        let t = token(
            &json!({"alg": "HS256"}),
            r#"{"exp":1,"key":"a","key":"b","exp":7}"#,
        );
        let parsed = Token::parse(&t, "exp", false).unwrap();
        assert_eq!(parsed.claims.key, Some(json!(7)), "key_claim_name exp");
        assert_eq!(parsed.claims.exp, Some(json!(7)));
        let parsed = Token::parse(&t, "key", false).unwrap();
        assert_eq!(parsed.claims.key, Some(json!("b")));
        let kept = Token::parse(&t, "key", true).unwrap();
        assert_eq!(kept.claims.key, Some(json!("b")));
    }

    #[test]
    fn escaped_member_names_and_crit_are_read() {
        let t = token(&json!({"alg": "HS256", "crit": []}), r#"{"k\u0065y":"x"}"#);
        let parsed = Token::parse(&t, "key", false).unwrap();
        assert!(parsed.crit);
        assert_eq!(parsed.claims.key, Some(json!("x")));
        let no_alg = token(&json!({"alg": 256}), "{}");
        assert_eq!(Token::parse(&no_alg, "key", false).unwrap().alg(), None);
    }

    #[test]
    fn anything_but_one_json_object_is_refused() {
        let header = json!({"alg": "HS256"});
        for (payload, why) in [
            ("[1]", "not a JSON object"),
            ("\"key\"", "not a JSON object"),
            ("{\"key\":", "not JSON"),
            ("{\"key\":1} {}", "not JSON"),
            ("{\"key\":1,\"x\":tru}", "not JSON"),
        ] {
            let err = Token::parse(&token(&header, payload), "key", false).unwrap_err();
            assert!(err.contains(why), "{payload}: {err}");
            let err = Token::parse(&token(&header, payload), "key", true).unwrap_err();
            assert!(err.contains(why), "{payload} (kept): {err}");
        }
        assert!(
            Token::parse("e30.!!!.sig", "key", false)
                .unwrap_err()
                .contains("not base64url")
        );
    }

    #[test]
    fn a_payload_too_big_for_the_stack_buffer_is_decoded_too() {
        let big = format!(r#"{{"key":"k","pad":"{}"}}"#, "x".repeat(3000));
        let t = token(&json!({"alg": "HS256"}), &big);
        let parsed = Token::parse(&t, "key", false).unwrap();
        assert_eq!(parsed.claims.key, Some(json!("k")));
    }
}
