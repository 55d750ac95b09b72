//! Route matching with APISIX's radixtree semantics, precomputed per snapshot.
//!
//! APISIX looks up the exact path first, then the `*`-terminated prefixes from the
//! longest down; routes sharing a path are tried in `priority` order, and the first
//! whose host and method also match wins. The index makes that a handful of hash
//! lookups per request instead of a scan over every route, so 10k routes cost about
//! what 10 do.
use std::collections::HashMap;
use std::sync::Arc;

use crate::request::Request;
use crate::snapshot::Route;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UriPattern {
    Exact(String),
    /// `/api/*` is stored as `/api/`: it matches `/api/` and everything below it.
    Prefix(String),
}

impl UriPattern {
    pub fn parse(uri: &str) -> Self {
        match uri.strip_suffix('*') {
            Some(prefix) => UriPattern::Prefix(prefix.to_owned()),
            None => UriPattern::Exact(uri.to_owned()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// `*.example.com` is stored as `.example.com` and matches any deeper name.
    Wildcard(String),
}

impl HostPattern {
    pub fn parse(host: &str) -> Self {
        let host = host.to_ascii_lowercase();
        match host.strip_prefix('*') {
            Some(suffix) => HostPattern::Wildcard(suffix.to_owned()),
            None => HostPattern::Exact(host),
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h.eq_ignore_ascii_case(host),
            HostPattern::Wildcard(suffix) => {
                host.len() > suffix.len()
                    && host.as_bytes()[host.len() - suffix.len()..]
                        .eq_ignore_ascii_case(suffix.as_bytes())
            }
        }
    }
}

/// The compiled route index of one snapshot.
#[derive(Debug, Default)]
pub struct Router {
    by_id: HashMap<Arc<str>, Arc<Route>>,
    exact: HashMap<String, Vec<Arc<Route>>>,
    prefix: HashMap<String, Vec<Arc<Route>>>,
    /// Distinct prefix lengths, longest first.
    prefix_lens: Vec<usize>,
}

impl Router {
    pub fn new(routes: impl IntoIterator<Item = Arc<Route>>) -> Self {
        let mut router = Router::default();
        for route in routes {
            router.by_id.insert(route.id.clone(), route.clone());
            if !route.enabled {
                continue;
            }
            for uri in &route.uris {
                let (map, key) = match uri {
                    UriPattern::Exact(p) => (&mut router.exact, p),
                    UriPattern::Prefix(p) => (&mut router.prefix, p),
                };
                map.entry(key.clone()).or_default().push(route.clone());
            }
        }
        let order = |v: &mut Vec<Arc<Route>>| {
            v.sort_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.id.cmp(&b.id)))
        };
        router.exact.values_mut().for_each(order);
        router.prefix.values_mut().for_each(order);
        let mut lens: Vec<usize> = router.prefix.keys().map(String::len).collect();
        lens.sort_unstable_by(|a, b| b.cmp(a));
        lens.dedup();
        router.prefix_lens = lens;
        router
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<Route>> {
        self.by_id.get(id)
    }

    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.by_id.values()
    }

    /// The route for this request: Envoy's `route_id` context extension when present
    /// (an unknown or disabled id matches nothing), otherwise APISIX's matching.
    pub fn find(&self, req: &Request<'_>) -> Option<&Arc<Route>> {
        if let Some(id) = req.context_extension("route_id") {
            return self.by_id.get(id).filter(|r| r.enabled);
        }
        let accept = |r: &&Arc<Route>| r.accepts(req);
        if let Some(found) = self.exact.get(req.path).and_then(|c| c.iter().find(accept)) {
            return Some(found);
        }
        for &len in &self.prefix_lens {
            if len > req.path.len() || !req.path.is_char_boundary(len) {
                continue;
            }
            if let Some(found) = self
                .prefix
                .get(&req.path[..len])
                .and_then(|c| c.iter().find(accept))
            {
                return Some(found);
            }
        }
        None
    }
}

impl Route {
    fn accepts(&self, req: &Request<'_>) -> bool {
        (self.hosts.is_empty() || self.hosts.iter().any(|h| h.matches(req.host)))
            && (self.methods.is_empty() || self.methods.iter().any(|m| m.as_str() == req.method))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::tests::check;
    use crate::resources::HttpMethod;

    fn route(
        id: &str,
        uris: &[&str],
        hosts: &[&str],
        methods: &[HttpMethod],
        priority: i64,
    ) -> Arc<Route> {
        Arc::new(Route {
            id: id.into(),
            priority,
            enabled: true,
            uris: uris.iter().map(|u| UriPattern::parse(u)).collect(),
            hosts: hosts.iter().map(|h| HostPattern::parse(h)).collect(),
            methods: methods.to_vec(),
            plugins: Vec::new(),
            owned_headers: Vec::new(),
        })
    }

    fn find<'a>(router: &'a Router, method: &str, host: &str, path: &str) -> Option<&'a str> {
        let msg = check(method, host, path, &[]);
        let req = Request::from_check(&msg).unwrap();
        router.find(&req).map(|r| &*r.id)
    }

    #[test]
    fn exact_before_prefix_and_longest_prefix_first() {
        let router = Router::new([
            route("all", &["/*"], &[], &[], 0),
            route("api", &["/api/*"], &[], &[], 0),
            route("health", &["/api/health"], &[], &[], 0),
        ]);
        assert_eq!(find(&router, "GET", "h", "/api/health"), Some("health"));
        assert_eq!(find(&router, "GET", "h", "/api/health/x"), Some("api"));
        assert_eq!(find(&router, "GET", "h", "/api/"), Some("api"));
        assert_eq!(find(&router, "GET", "h", "/api"), Some("all"));
        assert_eq!(find(&router, "GET", "h", "/"), Some("all"));
    }

    #[test]
    fn priority_orders_routes_on_the_same_path_and_hosts_methods_filter() {
        let router = Router::new([
            route("low", &["/x"], &[], &[], 0),
            route("high", &["/x"], &["*.example.com"], &[HttpMethod::POST], 10),
        ]);
        assert_eq!(
            find(&router, "POST", "a.b.example.com:443", "/x"),
            Some("high")
        );
        assert_eq!(find(&router, "POST", "example.com", "/x"), Some("low"));
        // The absolute form of the name (trailing dot) is the same host, as in nginx.
        assert_eq!(
            find(&router, "POST", "a.example.com.:443", "/x"),
            Some("high")
        );
        assert_eq!(find(&router, "GET", "a.example.com", "/x"), Some("low"));
        assert_eq!(find(&router, "GET", "a.example.com", "/y"), None);
    }

    #[test]
    fn disabled_routes_never_match_and_route_id_selects_directly() {
        let mut off = route("off", &["/x"], &[], &[], 0);
        Arc::get_mut(&mut off).unwrap().enabled = false;
        let router = Router::new([off, route("other", &["/other"], &[], &[], 0)]);
        assert_eq!(find(&router, "GET", "h", "/x"), None);
        let mut msg = check("GET", "h", "/nothing", &[]);
        msg.attributes
            .as_mut()
            .unwrap()
            .context_extensions
            .push(crate::wire::Entry::new("route_id", "other"));
        let req = Request::from_check(&msg).unwrap();
        assert_eq!(router.find(&req).map(|r| &*r.id), Some("other"));
        msg.attributes
            .as_mut()
            .unwrap()
            .context_extensions
            .push(crate::wire::Entry::new("route_id", "off"));
        let req = Request::from_check(&msg).unwrap();
        assert!(router.find(&req).is_none());
    }

    #[test]
    fn ten_thousand_routes_resolve_by_index() {
        let routes: Vec<_> = (0..10_000)
            .map(|i| route(&format!("r{i}"), &[&format!("/svc{i}/*")], &[], &[], 0))
            .collect();
        let router = Router::new(routes);
        assert_eq!(find(&router, "GET", "h", "/svc9999/items/1"), Some("r9999"));
        assert_eq!(find(&router, "GET", "h", "/nope"), None);
    }
}
