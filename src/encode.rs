//! The only place that builds Envoy's `CheckResponse`.
//!
//! Envoy's handling of header mutations has changed between versions, so every
//! header carries an explicit append action: identity headers overwrite whatever the
//! client sent, `Set-Cookie` appends (a session refresh must not erase the
//! upstream's cookies). Denials always carry an explicit HTTP status — without one
//! Envoy answers 403 whatever we meant. Header names or values that could split a
//! header (CR, LF, NUL) are dropped here, whatever produced them.
use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, QueryParameter, header_value_option::HeaderAppendAction,
};
use envoy_types::pb::envoy::service::auth::v3::{
    CheckResponse, DeniedHttpResponse, OkHttpResponse, check_response::HttpResponse,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{
    BoolValue, ListValue, Struct, Value as PbValue, value::Kind,
};
use envoy_types::pb::google::rpc::Status;

use crate::decision::{
    Allow, Decision, Deny, HeaderName, is_safe_header_name, is_safe_header_value,
};

const GRPC_OK: i32 = 0;
const GRPC_PERMISSION_DENIED: i32 = 7;

pub fn check_response(decision: Decision) -> CheckResponse {
    match decision {
        Decision::Allow(allow) => ok_response(allow),
        Decision::Deny(deny) => denied_response(deny),
    }
}

fn header(name: &str, value: String, append: bool) -> HeaderValueOption {
    #[allow(deprecated)]
    HeaderValueOption {
        header: Some(HeaderValue {
            key: name.to_owned(),
            value,
            ..Default::default()
        }),
        // `append: false` pins overwrite on versions that read the deprecated field.
        // For appends it stays unset: Envoy files a denied-response header with
        // `append: true` under "append only if already present", which silently
        // drops the first Set-Cookie of a login redirect.
        append: (!append).then_some(BoolValue { value: false }),
        append_action: if append {
            HeaderAppendAction::AppendIfExistsOrAdd
        } else {
            HeaderAppendAction::OverwriteIfExistsOrAdd
        } as i32,
        keep_empty_value: false,
    }
}

/// Set-Cookie is the one response header that must be repeated, never merged.
fn appends(name: &str) -> bool {
    name.eq_ignore_ascii_case("set-cookie")
}

fn safe_headers(
    headers: Vec<(HeaderName, String)>,
    append_cookies: bool,
) -> Vec<HeaderValueOption> {
    headers
        .into_iter()
        .filter(|(name, value)| {
            let ok = is_safe_header_name(name) && is_safe_header_value(value);
            if !ok {
                tracing::warn!(header = %name.escape_debug(), "dropped a header with an unsafe name or value");
            }
            ok
        })
        .map(|(name, value)| {
            let append = append_cookies && appends(&name);
            header(&name, value, append)
        })
        .collect()
}

fn ok_response(allow: Allow) -> CheckResponse {
    let Allow {
        upstream_set,
        upstream_remove,
        client_headers,
        query_remove,
        metadata,
    } = allow;
    let dynamic_metadata = (!metadata.is_empty()).then(|| Struct {
        fields: metadata
            .into_iter()
            .map(|(ns, v)| (ns.to_owned(), to_pb(v)))
            .collect(),
    });
    CheckResponse {
        status: Some(Status {
            code: GRPC_OK,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: safe_headers(upstream_set, false),
            headers_to_remove: upstream_remove,
            response_headers_to_add: safe_headers(client_headers, true),
            query_parameters_to_remove: query_remove,
            query_parameters_to_set: Vec::<QueryParameter>::new(),
            ..Default::default()
        })),
        dynamic_metadata,
    }
}

fn denied_response(deny: Deny) -> CheckResponse {
    CheckResponse {
        status: Some(Status {
            code: GRPC_PERMISSION_DENIED,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(deny.status),
            }),
            headers: safe_headers(deny.headers, true),
            body: deny.body,
        })),
        dynamic_metadata: None,
    }
}

/// JSON → protobuf `Value`, for dynamic metadata.
pub fn to_pb(v: serde_json::Value) -> PbValue {
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s),
        J::Array(a) => Kind::ListValue(ListValue {
            values: a.into_iter().map(to_pb).collect(),
        }),
        J::Object(o) => Kind::StructValue(Struct {
            fields: o.into_iter().map(|(k, v)| (k, to_pb(v))).collect(),
        }),
    };
    PbValue { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_sets_overwrite_and_cookies_append() {
        let mut allow = Allow::default();
        allow.set_upstream("x-consumer-username", "jack");
        allow.remove_upstream("x-userinfo");
        allow.add_client_header("set-cookie", "a=1");
        allow.add_client_header("x-ratelimit-limit", "3");
        allow.set_upstream("x-bad", "a\r\nb");
        let resp = check_response(Decision::Allow(allow));
        assert_eq!(resp.status.unwrap().code, GRPC_OK);
        let Some(HttpResponse::OkResponse(ok)) = resp.http_response else {
            panic!("not ok")
        };
        assert_eq!(ok.headers.len(), 1, "the unsafe header is dropped");
        let h = &ok.headers[0];
        assert_eq!(h.header.as_ref().unwrap().key, "x-consumer-username");
        assert_eq!(
            h.append_action,
            HeaderAppendAction::OverwriteIfExistsOrAdd as i32
        );
        assert_eq!(ok.headers_to_remove, vec!["x-userinfo"]);
        assert_eq!(
            ok.response_headers_to_add[0].append_action,
            HeaderAppendAction::AppendIfExistsOrAdd as i32
        );
        assert_eq!(
            ok.response_headers_to_add[1].append_action,
            HeaderAppendAction::OverwriteIfExistsOrAdd as i32
        );
    }

    #[test]
    fn deny_always_has_an_explicit_status() {
        let resp = check_response(Decision::Deny(Deny::message(
            401,
            "Missing JWT token in request",
        )));
        assert_eq!(resp.status.unwrap().code, GRPC_PERMISSION_DENIED);
        let Some(HttpResponse::DeniedResponse(d)) = resp.http_response else {
            panic!("not denied")
        };
        assert_eq!(d.status.unwrap().code, 401);
        assert_eq!(d.body, r#"{"message":"Missing JWT token in request"}"#);
    }
}
