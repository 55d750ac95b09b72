//! portcullis: an Envoy ext_authz server with Apache APISIX's auth plugin semantics.
#![forbid(unsafe_code)]
