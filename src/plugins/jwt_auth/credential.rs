//! The consumer side of jwt-auth: one credential's key, algorithm and verification
//! key, checked and decoded once when the snapshot is built.
//!
//! The field set and defaults are APISIX's `consumer_schema`. The decoded
//! [`DecodingKey`] is what every request verifies against: no PEM or base64 is
//! parsed on the hot path, and a key that cannot verify anything (wrong type for the
//! algorithm, empty HMAC secret, truncated Ed25519 key) is a configuration error,
//! not a 401 at run time.
use base64::Engine;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind};
use serde::Deserialize;
use serde_json::Value;

/// nginx's `ngx.decode_base64`, which APISIX uses for `base64_secret`: the
/// standard alphabet, padding optional.
const NGX_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    key: String,
    secret: Option<String>,
    public_key: Option<String>,
    #[serde(default = "default_algorithm")]
    algorithm: String,
    #[serde(default = "default_exp")]
    exp: i64,
    #[serde(default)]
    base64_secret: bool,
    #[serde(default)]
    lifetime_grace_period: i64,
    /// Accepted so credentials written for APISIX < 3.9 load unchanged; never used
    /// (portcullis does not sign tokens).
    #[serde(default)]
    #[allow(dead_code)]
    private_key: Option<String>,
}

fn default_algorithm() -> String {
    "HS256".into()
}

fn default_exp() -> i64 {
    86400
}

/// A verified-ready jwt-auth credential.
#[derive(Debug)]
pub struct Credential {
    pub key: VerifyKey,
    /// Seconds of clock skew tolerated on `exp` and `nbf`.
    pub lifetime_grace_period: u64,
    /// APISIX's lifetime for tokens it signs; portcullis signs none, so unused.
    pub exp: u64,
}

const ALGORITHMS: &[(&str, Option<Algorithm>)] = &[
    ("HS256", Some(Algorithm::HS256)),
    ("HS384", Some(Algorithm::HS384)),
    ("HS512", Some(Algorithm::HS512)),
    ("RS256", Some(Algorithm::RS256)),
    ("RS384", Some(Algorithm::RS384)),
    ("RS512", Some(Algorithm::RS512)),
    ("ES256", Some(Algorithm::ES256)),
    ("ES384", Some(Algorithm::ES384)),
    // jsonwebtoken has no P-521 verifier: `VerifyKey::Es512` uses the p521 crate.
    ("ES512", None),
    ("PS256", Some(Algorithm::PS256)),
    ("PS384", Some(Algorithm::PS384)),
    ("PS512", Some(Algorithm::PS512)),
    ("EdDSA", Some(Algorithm::EdDSA)),
];

impl Credential {
    /// The algorithm as APISIX spells it; a token's `alg` must equal it exactly.
    /// Derived from the key rather than stored: 16 bytes on each of 100k credentials.
    /// Always `Some`: keys are only built for algorithms of the table.
    pub fn algorithm_name(&self) -> Option<&'static str> {
        let algorithm = match &self.key {
            VerifyKey::Hmac { algorithm, .. } | VerifyKey::Jwt { algorithm, .. } => *algorithm,
            VerifyKey::Es512(_) => return Some("ES512"),
        };
        ALGORITHMS
            .iter()
            .find_map(|(name, a)| (*a == Some(algorithm)).then_some(*name))
    }

    /// Checks a consumer-side jwt-auth config and decodes its key. Returns the
    /// lookup key (`key`) with the credential.
    pub fn compile(conf: &Value) -> Result<(String, Self), String> {
        let conf: Conf = serde_json::from_value(conf.clone()).map_err(|e| e.to_string())?;
        if conf.key.is_empty() {
            return Err("property \"key\" validation failed: string too short".into());
        }
        if conf.exp < 1 {
            return Err("property \"exp\" validation failed: expected >= 1".into());
        }
        if conf.lifetime_grace_period < 0 {
            return Err(
                "property \"lifetime_grace_period\" validation failed: expected >= 0".into(),
            );
        }
        let Some(&(algorithm_name, algorithm)) =
            ALGORITHMS.iter().find(|(name, _)| *name == conf.algorithm)
        else {
            let names: Vec<&str> = ALGORITHMS.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "property \"algorithm\" validation failed: matches none of the enum values ({})",
                names.join(", ")
            ));
        };
        let key = match algorithm {
            None => VerifyKey::Es512(Box::new(es512_key(&conf)?)),
            Some(algorithm) if algorithm_name.starts_with("HS") => VerifyKey::Hmac {
                secret: hmac_secret(&conf)?,
                algorithm,
            },
            Some(algorithm) => VerifyKey::Jwt {
                key: Box::new(public_key(&conf, algorithm)?),
                algorithm,
            },
        };
        Ok((
            conf.key,
            Credential {
                key,
                lifetime_grace_period: conf.lifetime_grace_period as u64,
                exp: conf.exp as u64,
            },
        ))
    }
}

/// The key a credential verifies signatures with, decoded once.
pub enum VerifyKey {
    /// HS256, HS384, HS512: the secret's bytes. jsonwebtoken's `DecodingKey` holds the
    /// same bytes in a 56-byte enum, and most of 100k credentials are HMAC ones.
    Hmac {
        secret: Box<[u8]>,
        algorithm: Algorithm,
    },
    /// RSA, ECDSA P-256/P-384 and EdDSA, through jsonwebtoken. Boxed, like ES512.
    Jwt {
        key: Box<DecodingKey>,
        algorithm: Algorithm,
    },
    /// ECDSA P-521 with SHA-512 (ES512). Boxed: the point is ~200 bytes inline and
    /// would size every credential (100k of them, mostly HMAC) to it.
    Es512(Box<p521::ecdsa::VerifyingKey>),
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VerifyKey::Hmac { algorithm, .. } => write!(f, "VerifyKey::Hmac({algorithm:?})"),
            VerifyKey::Jwt { algorithm, .. } => write!(f, "VerifyKey::Jwt({algorithm:?})"),
            VerifyKey::Es512(_) => f.write_str("VerifyKey::Es512"),
        }
    }
}

impl VerifyKey {
    /// RSA, ECDSA and EdDSA: verification costs far more than hashing the token,
    /// so their results are worth remembering (`plugins::verified`). HMAC is not:
    /// recomputing it costs about as much as the cache lookup.
    pub fn is_asymmetric(&self) -> bool {
        match self {
            VerifyKey::Hmac { .. } => false,
            VerifyKey::Jwt { .. } | VerifyKey::Es512(_) => true,
        }
    }

    /// Verifies `signature` (base64url, as in the token) over `signing_input`.
    pub fn verify(&self, signature: &str, signing_input: &[u8]) -> Result<bool, String> {
        match self {
            VerifyKey::Hmac { secret, algorithm } => {
                use hmac::Hmac;
                use sha2::{Sha256, Sha384, Sha512};
                // As jsonwebtoken's HMAC verifier: unpadded base64url, then a
                // constant-time comparison of the whole MAC.
                let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(signature)
                    .map_err(|e| format!("Base64 error: {e}"))?;
                Ok(match algorithm {
                    Algorithm::HS256 => {
                        hmac_matches::<Hmac<Sha256>>(secret, signing_input, &signature)
                    }
                    Algorithm::HS384 => {
                        hmac_matches::<Hmac<Sha384>>(secret, signing_input, &signature)
                    }
                    Algorithm::HS512 => {
                        hmac_matches::<Hmac<Sha512>>(secret, signing_input, &signature)
                    }
                    other => return Err(format!("{other:?} is not an HMAC algorithm")),
                })
            }
            VerifyKey::Jwt { key, algorithm } => {
                jsonwebtoken::crypto::verify(signature, signing_input, key, *algorithm)
                    .map_err(|e| e.to_string())
            }
            VerifyKey::Es512(key) => {
                use base64::Engine as _;
                use p521::ecdsa::signature::Verifier as _;
                let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(signature)
                    .map_err(|e| format!("signature is not base64url: {e}"))?;
                // r || s, 66 bytes each; zero or out-of-range scalars are refused here.
                let sig = p521::ecdsa::Signature::from_slice(&raw)
                    .map_err(|_| "not a P-521 signature (r || s, 132 bytes)".to_string())?;
                Ok(key.verify(signing_input, &sig).is_ok())
            }
        }
    }
}

fn es512_key(conf: &Conf) -> Result<p521::ecdsa::VerifyingKey, String> {
    use p521::pkcs8::DecodePublicKey as _;
    let Some(pem) = conf.public_key.as_deref().filter(|p| !p.is_empty()) else {
        return Err("missing valid public key".into());
    };
    let key = p521::PublicKey::from_public_key_pem(pem)
        .map_err(|e| format!("invalid public_key for ES512: expected a P-521 key ({e})"))?;
    p521::ecdsa::VerifyingKey::from_sec1_bytes(&key.to_sec1_bytes())
        .map_err(|e| format!("invalid public_key for ES512: {e}"))
}

/// Whether `signature` is the MAC of `input` under `secret`.
fn hmac_matches<M: hmac::Mac + hmac::digest::KeyInit>(
    secret: &[u8],
    input: &[u8],
    signature: &[u8],
) -> bool {
    // HMAC takes keys of any length; compiling refused the empty one.
    let Ok(mut mac) = <M as hmac::digest::KeyInit>::new_from_slice(secret) else {
        return false;
    };
    hmac::Mac::update(&mut mac, input);
    mac.verify_slice(signature).is_ok()
}

fn hmac_secret(conf: &Conf) -> Result<Box<[u8]>, String> {
    let Some(secret) = conf.secret.as_deref() else {
        return Err("property \"secret\" is required when using HS based algorithms".into());
    };
    if secret.is_empty() {
        return Err("property \"secret\" validation failed: string too short".into());
    }
    let bytes = if conf.base64_secret {
        NGX_BASE64.decode(secret).map_err(|_| {
            "base64_secret required but the secret is not in base64 format".to_string()
        })?
    } else {
        secret.as_bytes().to_vec()
    };
    if bytes.is_empty() {
        return Err("the secret decodes to no bytes: an empty HMAC key is refused".into());
    }
    Ok(bytes.into_boxed_slice())
}

fn public_key(conf: &Conf, algorithm: Algorithm) -> Result<DecodingKey, String> {
    let Some(pem) = conf.public_key.as_deref().filter(|p| !p.is_empty()) else {
        return Err("missing valid public key".into());
    };
    let pem = pem.as_bytes();
    let invalid =
        |e: jsonwebtoken::errors::Error| format!("invalid public_key for {algorithm:?}: {e}");
    let key = match algorithm {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => {
            let key = DecodingKey::from_rsa_pem(pem).map_err(invalid)?;
            // Parse the RSA structure now, so a broken key is a config error and the
            // hot path starts from (n, e) instead of DER.
            let DecodingKeyKind::SecretOrDer(der) = key.kind() else {
                return Err(format!("invalid public_key for {algorithm:?}"));
            };
            let (n, e) = (jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER
                .key_utils
                .rsa_pub_components_from_public_key)(der)
            .map_err(invalid)?;
            DecodingKey::from_rsa_raw_components(&n, &e)
        }
        Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem).map_err(invalid)?,
        Algorithm::EdDSA => {
            let key = DecodingKey::from_ed_pem(pem).map_err(invalid)?;
            // jsonwebtoken slices the first 32 bytes of the key without checking.
            if !matches!(key.kind(), DecodingKeyKind::SecretOrDer(k) if k.len() == 32) {
                return Err("invalid public_key for EdDSA: expected an Ed25519 key".into());
            }
            key
        }
        _ => return Err(format!("{algorithm:?} is not an asymmetric algorithm")),
    };
    // Building a verifier parses the key for the algorithm's curve: an EC key of the
    // wrong curve, or an Ed key that is not a valid point, fails here.
    jsonwebtoken::crypto::verify("AA", b"", &key, algorithm)
        .map_err(|e| format!("invalid public_key for {algorithm:?}: {e}"))?;
    Ok(key)
}
