//! What a Check decides, independent of the wire format that carries it.
//!
//! Plugins add to an [`Allow`] as they run and may end the pipeline with a [`Deny`];
//! only `encode` (gRPC) and the HTTP front turn these into protocol answers. Denials
//! are values, not errors: every outcome, including bad input, is a decision.
use std::borrow::Cow;

pub type HeaderName = Cow<'static, str>;

/// Identity headers portcullis owns: a client can never set them. Any header whose
/// name equals one of these after `_` → `-` normalisation is removed from the
/// upstream request unless a plugin set it on this request.
pub const OWNED_IDENTITY_HEADERS: &[&str] = &[
    "x-consumer-username",
    "x-credential-identifier",
    "x-consumer-custom-id",
    "x-access-token",
    "x-id-token",
    "x-userinfo",
    "x-refresh-token",
    "x-raw-id-token",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(Allow),
    Deny(Deny),
}

/// Mutations applied when the request is allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allow {
    /// Headers set on the upstream request, overwriting what the client sent.
    pub upstream_set: Vec<(HeaderName, String)>,
    /// Headers removed from the upstream request. Never overlaps `upstream_set`:
    /// Envoy applies removals after sets, so an overlap would erase our own value.
    pub upstream_remove: Vec<String>,
    /// Headers added to the response sent to the client.
    pub client_headers: Vec<(HeaderName, String)>,
    pub query_remove: Vec<String>,
    /// Values exposed to Envoy as dynamic metadata (namespace = the plugin name).
    pub metadata: Vec<(&'static str, serde_json::Value)>,
}

impl Allow {
    /// Sets `name` (lower case) on the upstream request.
    pub fn set_upstream(&mut self, name: impl Into<HeaderName>, value: impl Into<String>) {
        let name = name.into();
        self.upstream_remove.retain(|r| *r != *name);
        match self.upstream_set.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value.into(),
            None => self.upstream_set.push((name, value.into())),
        }
    }

    /// Removes `name` (lower case) from the upstream request, unless something on
    /// this request set it.
    pub fn remove_upstream(&mut self, name: &str) {
        if self.upstream_set.iter().any(|(n, _)| n == name) {
            return;
        }
        if !self.upstream_remove.iter().any(|r| r == name) {
            self.upstream_remove.push(name.to_owned());
        }
    }

    /// Forgets a value set earlier in the pipeline for a header portcullis owns (an
    /// identity header, forward-auth's `upstream_headers`). No removal is sent:
    /// [`Allow::scrub_owned`] removes the client's copy at the end of the pipeline, and
    /// only when the client sent one. Envoy applies, validates and (with
    /// `clear_route_cache`) re-routes on every mutation an answer carries.
    pub fn forget_owned_upstream(&mut self, name: &str) {
        self.upstream_set.retain(|(n, _)| n != name);
    }

    /// Drops a header set earlier in the pipeline and removes the client's copy.
    pub fn unset_upstream(&mut self, name: &str) {
        self.upstream_set.retain(|(n, _)| n != name);
        self.remove_upstream(name);
    }

    pub fn add_client_header(&mut self, name: impl Into<HeaderName>, value: impl Into<String>) {
        self.client_headers.push((name.into(), value.into()));
    }

    /// Removes every client-sent header that spoofs one we own: the exact name and
    /// any `_`/`-` variant (Envoy passes underscores through by default). Headers we
    /// set on this request are overwritten by Envoy instead, so their exact name is
    /// left alone.
    pub fn scrub_owned(&mut self, headers: crate::request::Headers<'_>, extra_owned: &[String]) {
        headers.for_each_name(|name| {
            let owned = |o: &str| same_header_name(name, o);
            if !OWNED_IDENTITY_HEADERS.iter().any(|o| owned(o))
                && !extra_owned.iter().any(|o| owned(o))
            {
                return;
            }
            if self.upstream_set.iter().any(|(n, _)| n == name) {
                return;
            }
            if !self.upstream_remove.iter().any(|r| r == name) {
                self.upstream_remove.push(name.to_owned());
            }
        });
    }
}

/// Header names compare case-insensitively, and `_` matches `-`.
pub fn same_header_name(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes().zip(b.bytes()).all(|(x, y)| {
            let norm = |c: u8| {
                if c == b'_' {
                    b'-'
                } else {
                    c.to_ascii_lowercase()
                }
            };
            norm(x) == norm(y)
        })
}

/// A denial the client receives as-is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deny {
    pub status: u16,
    pub headers: Vec<(HeaderName, String)>,
    pub body: String,
    /// For logs and metrics only, never sent to the client.
    pub reason: Cow<'static, str>,
}

impl Deny {
    pub fn new(status: u16) -> Self {
        Deny {
            status,
            headers: Vec::new(),
            body: String::new(),
            reason: Cow::Borrowed(""),
        }
    }

    /// A JSON body `{"message": ...}`, the shape APISIX answers with.
    pub fn message(status: u16, message: &str) -> Self {
        Self::new(status).json(&serde_json::json!({ "message": message }))
    }

    pub fn json(mut self, body: &serde_json::Value) -> Self {
        self.body = body.to_string();
        self.header("content-type", "application/json")
    }

    pub fn header(mut self, name: impl Into<HeaderName>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn because(mut self, reason: impl Into<Cow<'static, str>>) -> Self {
        self.reason = reason.into();
        self
    }
}

/// Header values copied from claims or auth services must not smuggle a second
/// header or terminate the message.
pub fn is_safe_header_value(value: &str) -> bool {
    memchr::memchr3(b'\r', b'\n', 0, value.as_bytes()).is_none()
}

pub fn is_safe_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_wins_over_remove_and_they_never_overlap() {
        let mut a = Allow::default();
        a.remove_upstream("x-user");
        a.set_upstream("x-user", "alice");
        a.remove_upstream("x-user");
        assert_eq!(a.upstream_set, vec![("x-user".into(), "alice".into())]);
        assert!(a.upstream_remove.is_empty());
        a.unset_upstream("x-user");
        assert!(a.upstream_set.is_empty());
        assert_eq!(a.upstream_remove, vec!["x-user".to_string()]);
    }

    #[test]
    fn scrub_removes_spoofed_identity_headers_and_underscore_variants() {
        let sent: Vec<(String, String)> = [
            ("x-consumer-username", "admin"),
            ("x-consumer_username", "admin"),
            ("x_userinfo", "e30="),
            ("x-user-id", "1"),
            ("accept", "*/*"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut a = Allow::default();
        a.set_upstream("x-consumer-username", "jack");
        a.scrub_owned(
            crate::request::Headers::Pairs(&sent),
            &["x-user-id".to_string()],
        );
        let mut removed = a.upstream_remove.clone();
        removed.sort();
        assert_eq!(
            removed,
            vec!["x-consumer_username", "x-user-id", "x_userinfo"]
        );
    }

    #[test]
    fn header_safety() {
        assert!(!is_safe_header_value("a\r\nSet-Cookie: x"));
        assert!(is_safe_header_value("Bearer abc"));
        assert!(!is_safe_header_name("x y"));
        assert!(is_safe_header_name("x-user-id"));
    }
}
