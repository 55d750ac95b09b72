//! A real OpenID Provider for end-to-end tests.
//!
//! The openid-connect plugin is only worth what the OP it is tested against is worth, so tests
//! start panva's certified `oidc-provider` (npm, see `tests/oidc/provider.mjs`) on 127.0.0.1 with
//! an ephemeral port, configure it through [`ProviderSettings`], and stop it when the
//! [`OidcProvider`] is dropped. Besides starting it, this module scripts what a browser would do
//! at the OP (the dev login and consent forms, the logout confirmation) and mints tokens by the
//! client_credentials grant, so no test needs a browser to get a real token.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

/// How long the OP may take to print its ready line (it starts in well under a second on an
/// idle machine; a loaded shared CI machine has been seen to need more than 20 s).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// OPs of one test binary start one at a time: node's start-up (module loading, RSA key
/// generation) is CPU-heavy, and parallel tests starting several at once starve each other.
static STARTING: Mutex<()> = Mutex::new(());
/// How many redirects and forms a scripted login or logout may go through before giving up.
const MAX_STEPS: usize = 16;

/// What the OP is started with; serialised as the JSON document `provider.mjs` reads.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProviderSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub clients: Vec<ClientSettings>,
    /// Resource indicator → the resource server it names.
    pub resources: BTreeMap<String, ResourceSettings>,
    /// oidc-provider TTL names (`AccessToken`, `ClientCredentials`, `IdToken`, `RefreshToken`,
    /// `AuthorizationCode`, `Session`, `Interaction`, `Grant`) → seconds.
    pub ttl: BTreeMap<String, u64>,
    /// Extra scopes the OP accepts besides openid, offline_access, email, profile and the
    /// resources' scopes.
    pub scopes: Vec<String>,
    /// Login name → extra claims released with the `profile` scope.
    pub accounts: BTreeMap<String, Value>,
    /// `Some(false)` puts scope claims into ID tokens too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conform_id_token_claims: Option<bool>,
    /// `Some(true)` makes PKCE mandatory for confidential clients too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pkce_required: Option<bool>,
}

impl ProviderSettings {
    pub fn client(mut self, client: ClientSettings) -> Self {
        self.clients.push(client);
        self
    }

    pub fn resource(mut self, indicator: &str, resource: ResourceSettings) -> Self {
        self.resources.insert(indicator.to_owned(), resource);
        self
    }

    pub fn ttl(mut self, name: &str, seconds: u64) -> Self {
        self.ttl.insert(name.to_owned(), seconds);
        self
    }

    pub fn account(mut self, login: &str, claims: Value) -> Self {
        self.accounts.insert(login.to_owned(), claims);
        self
    }
}

/// One registered client (OAuth 2.0 dynamic registration metadata names).
#[derive(Debug, Clone, Serialize)]
pub struct ClientSettings {
    pub client_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    pub redirect_uris: Vec<String>,
    pub post_logout_redirect_uris: Vec<String>,
    /// `client_secret_basic` (the OP's default), `client_secret_post` or `none`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_endpoint_auth_method: Option<String>,
    /// Default: authorization_code, refresh_token and client_credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_types: Option<Vec<String>>,
}

impl ClientSettings {
    /// A confidential client that may use every grant the tests need.
    pub fn confidential(client_id: &str, client_secret: &str) -> Self {
        Self {
            client_id: client_id.to_owned(),
            client_secret: Some(client_secret.to_owned()),
            redirect_uris: Vec::new(),
            post_logout_redirect_uris: Vec::new(),
            token_endpoint_auth_method: None,
            grant_types: None,
        }
    }

    pub fn redirect_uri(mut self, uri: &str) -> Self {
        self.redirect_uris.push(uri.to_owned());
        self
    }

    pub fn post_logout_redirect_uri(mut self, uri: &str) -> Self {
        self.post_logout_redirect_uris.push(uri.to_owned());
        self
    }

    pub fn auth_method(mut self, method: &str) -> Self {
        self.token_endpoint_auth_method = Some(method.to_owned());
        self
    }

    pub fn grant_types(mut self, grants: &[&str]) -> Self {
        self.grant_types = Some(grants.iter().map(|g| (*g).to_owned()).collect());
        self
    }

    fn secret(&self) -> &str {
        self.client_secret.as_deref().unwrap_or("")
    }
}

/// Access token format a resource server gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenFormat {
    /// Signed by the OP's current key, verifiable with its JWKS; not introspectable.
    Jwt,
    /// A reference token, only useful through the introspection endpoint.
    Opaque,
}

/// A resource server named by a resource indicator (RFC 8707).
#[derive(Debug, Clone, Serialize)]
pub struct ResourceSettings {
    pub format: TokenFormat,
    /// Space-separated scopes this resource server accepts.
    pub scope: String,
    /// The `aud` of its tokens; default the resource indicator itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// JWT signing algorithm: `RS256` (default) or `ES256`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    /// Access token lifetime in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u64>,
}

impl ResourceSettings {
    pub fn new(format: TokenFormat, scope: &str) -> Self {
        Self {
            format,
            scope: scope.to_owned(),
            audience: None,
            alg: None,
            ttl: None,
        }
    }

    pub fn audience(mut self, audience: &str) -> Self {
        self.audience = Some(audience.to_owned());
        self
    }

    pub fn alg(mut self, alg: &str) -> Self {
        self.alg = Some(alg.to_owned());
        self
    }

    pub fn ttl(mut self, seconds: u64) -> Self {
        self.ttl = Some(seconds);
        self
    }
}

/// A running OP. Dropping it kills the node process.
pub struct OidcProvider {
    /// `http://127.0.0.1:PORT`, also the discovery issuer.
    pub issuer: String,
    pub port: u16,
    child: Child,
    /// Held open: `provider.mjs` exits when it closes, so a crashed test leaves no OP behind.
    _stdin: ChildStdin,
    stderr: Arc<Mutex<String>>,
    http: reqwest::Client,
}

impl OidcProvider {
    /// Starts `node tests/oidc/provider.mjs` and waits until it listens.
    pub fn start(settings: &ProviderSettings) -> Self {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/oidc");
        assert!(
            dir.join("node_modules/oidc-provider/package.json")
                .is_file(),
            "the test OpenID Provider is not installed; run: npm ci --prefix tests/oidc"
        );
        let _one_at_a_time = STARTING.lock().unwrap_or_else(|e| e.into_inner());
        let settings_json = serde_json::to_string(settings).expect("settings serialise");
        let mut child = Command::new("node")
            .arg(dir.join("provider.mjs"))
            .arg(&settings_json)
            .env("OIDC_PROVIDER_EXIT_ON_STDIN_EOF", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run `node` for the test OpenID Provider: {e}"));

        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr_pipe = child.stderr.take().expect("piped stderr");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]);
                sink.lock().expect("stderr buffer").push_str(&text);
            }
        });
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = ready_tx.send(line);
            }
            // Keep draining so the OP never blocks on a full pipe.
            for _ in lines {}
        });

        let line = match ready_rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(50));
                panic!(
                    "the test OpenID Provider did not start; its stderr:\n{}",
                    stderr.lock().expect("stderr buffer")
                );
            }
        };
        let ready: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("unexpected ready line {line:?} from provider.mjs: {e}"));
        let issuer = ready["issuer"]
            .as_str()
            .expect("issuer in ready line")
            .to_owned();
        let port = ready["port"].as_u64().expect("port in ready line") as u16;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .expect("reqwest client");
        Self {
            issuer,
            port,
            child,
            _stdin: stdin,
            stderr,
            http,
        }
    }

    /// Everything the OP wrote on stderr so far (warnings, errors), for failure messages.
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr buffer").clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.issuer)
    }

    pub fn discovery_url(&self) -> String {
        self.url("/.well-known/openid-configuration")
    }

    pub async fn discovery(&self) -> Value {
        self.get_json(&self.discovery_url()).await
    }

    pub async fn jwks(&self) -> Value {
        self.get_json(&self.url("/jwks")).await
    }

    async fn get_json(&self, url: &str) -> Value {
        let response = self.http.get(url).send().await.expect("GET at the OP");
        assert!(
            response.status().is_success(),
            "GET {url}: {}",
            response.status()
        );
        response.json().await.expect("JSON from the OP")
    }

    /// POSTs a form to the token endpoint with client_secret_basic and returns the JSON answer
    /// (a token response, or an error document).
    pub async fn token_request(
        &self,
        client: &ClientSettings,
        form: &[(&str, &str)],
    ) -> (u16, Value) {
        let response = self
            .http
            .post(self.url("/token"))
            .basic_auth(&client.client_id, Some(client.secret()))
            .form(form)
            .send()
            .await
            .expect("POST /token");
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON from /token"))
    }

    /// A real access token from the client_credentials grant: a JWT when `resource` names a
    /// [`TokenFormat::Jwt`] resource server, an opaque (introspectable) one otherwise.
    pub async fn client_credentials_token(
        &self,
        client: &ClientSettings,
        resource: Option<&str>,
        scope: &str,
    ) -> String {
        let mut form = vec![("grant_type", "client_credentials"), ("scope", scope)];
        if let Some(resource) = resource {
            form.push(("resource", resource));
        }
        let (status, body) = self.token_request(client, &form).await;
        assert_eq!(status, 200, "client_credentials at the OP: {body}");
        body["access_token"]
            .as_str()
            .expect("access_token")
            .to_owned()
    }

    /// RFC 7662 introspection as `client`.
    pub async fn introspect(&self, client: &ClientSettings, token: &str) -> Value {
        let response = self
            .http
            .post(self.url("/token/introspection"))
            .basic_auth(&client.client_id, Some(client.secret()))
            .form(&[("token", token)])
            .send()
            .await
            .expect("POST /token/introspection");
        assert!(
            response.status().is_success(),
            "introspection: {}",
            response.status()
        );
        response.json().await.expect("JSON from introspection")
    }

    /// TEST CONTROL: how many requests the OP has served at `path` (e.g.
    /// `/token/introspection`, `/jwks`), to prove a relying party answered from its cache.
    pub async fn requests_to(&self, path: &str) -> u64 {
        let counts = self.get_json(&self.url("/__test/requests")).await;
        counts[path].as_u64().unwrap_or(0)
    }

    /// TEST CONTROL: a new RS256 and ES256 key pair becomes current; `keep_old` keeps the
    /// previous keys in the JWKS. Returns the new current kids (RS256 first).
    pub async fn rotate_keys(&self, keep_old: bool) -> Vec<String> {
        let response = self
            .http
            .post(self.url("/__test/rotate-keys"))
            .json(&serde_json::json!({ "keep_old": keep_old }))
            .send()
            .await
            .expect("POST /__test/rotate-keys");
        assert!(
            response.status().is_success(),
            "rotate-keys: {}",
            response.status()
        );
        let body: Value = response.json().await.expect("JSON from rotate-keys");
        body["kids"]
            .as_array()
            .expect("kids")
            .iter()
            .map(|k| k.as_str().expect("kid").to_owned())
            .collect()
    }

    /// Does at the OP what a user in a browser does: starting from `authorize_url` (the OP's
    /// authorization endpoint with its query, e.g. a relying party's redirect), it follows the
    /// OP's redirects, signs in as `login` on the dev login form and accepts the consent form.
    /// Returns the first redirect that leaves the OP: the relying party's redirect_uri with
    /// `code` and `state` (or an `error`).
    ///
    /// `browser` must keep cookies and must not follow redirects itself ([`browser`]).
    pub async fn log_in(
        &self,
        browser: &reqwest::Client,
        authorize_url: &str,
        login: &str,
    ) -> String {
        self.walk(browser, authorize_url, "login", |at, page| {
            let action = at
                .join(&form_action(page))
                .expect("form action")
                .to_string();
            if page.contains(r#"name="prompt" value="login""#) {
                Page::Next(Step::Post(
                    action,
                    vec![
                        ("prompt".into(), "login".into()),
                        ("login".into(), login.into()),
                        ("password".into(), "any password".into()),
                    ],
                ))
            } else if page.contains(r#"name="prompt" value="consent""#) {
                Page::Next(Step::Post(
                    action,
                    vec![("prompt".into(), "consent".into())],
                ))
            } else {
                panic!("unexpected page from the OP at {at}:\n{page}");
            }
        })
        .await
    }

    /// Does at the OP what a user does after an RP-initiated logout: from `end_session_url`
    /// (the OP's end_session endpoint with `id_token_hint` etc.) it confirms the logout form and
    /// returns where the OP sends the browser afterwards (the post_logout_redirect_uri, or the
    /// OP's own "signed out" page).
    pub async fn log_out(&self, browser: &reqwest::Client, end_session_url: &str) -> String {
        self.walk(browser, end_session_url, "logout", |at, page| {
            if page.contains("signed out") {
                return Page::Done(at.to_string());
            }
            let xsrf = input_value(page, "xsrf")
                .unwrap_or_else(|| panic!("no logout form from the OP at {at}:\n{page}"));
            let action = at
                .join(&form_action(page))
                .expect("form action")
                .to_string();
            Page::Next(Step::Post(
                action,
                vec![("xsrf".into(), xsrf), ("logout".into(), "yes".into())],
            ))
        })
        .await
    }

    /// Follows the OP's redirects from `start` and answers each of its pages with
    /// `answer`, until the OP sends the browser elsewhere (returned) or a page ends it.
    async fn walk(
        &self,
        browser: &reqwest::Client,
        start: &str,
        what: &str,
        mut answer: impl FnMut(&reqwest::Url, &str) -> Page,
    ) -> String {
        let mut next = Step::Get(start.to_owned());
        for _ in 0..MAX_STEPS {
            let response = match &next {
                Step::Get(url) => browser.get(url).send().await,
                Step::Post(url, form) => browser.post(url).form(form).send().await,
            }
            .expect("request at the OP");
            let at = response.url().clone();
            if response.status().is_redirection() {
                let location = redirect_target(&response);
                if !location.starts_with(&self.issuer) {
                    return location;
                }
                next = Step::Get(location);
                continue;
            }
            let status = response.status();
            let page = response.text().await.expect("page from the OP");
            assert!(
                status.is_success(),
                "the OP answered {status} at {at}:\n{page}"
            );
            match answer(&at, &page) {
                Page::Next(step) => next = step,
                Page::Done(at) => return at,
            }
        }
        panic!("the {what} at the OP did not finish in {MAX_STEPS} steps");
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cookie-keeping HTTP client that does not follow redirects, as the scripted browser.
pub fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .expect("reqwest client")
}

enum Step {
    Get(String),
    Post(String, Vec<(String, String)>),
}

/// What to do with a page the OP showed.
enum Page {
    Next(Step),
    Done(String),
}

fn redirect_target(response: &reqwest::Response) -> String {
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .expect("Location on a redirect")
        .to_str()
        .expect("ASCII Location");
    response
        .url()
        .join(location)
        .expect("resolvable Location")
        .to_string()
}

fn form_action(page: &str) -> String {
    let start = page.find("<form").expect("a form on the page");
    attribute(&page[start..], "action").expect("form action")
}

fn input_value(page: &str, name: &str) -> Option<String> {
    let at = page.find(&format!(r#"name="{name}""#))?;
    let tag_start = page[..at].rfind('<')?;
    attribute(&page[tag_start..], "value")
}

fn attribute(tag: &str, name: &str) -> Option<String> {
    let tag = &tag[..tag.find('>')?];
    let start = tag.find(&format!(r#"{name}=""#))? + name.len() + 2;
    let len = tag[start..].find('"')?;
    Some(html_unescape(&tag[start..start + len]))
}

fn html_unescape(value: &str) -> String {
    value
        .replace("&amp;", "&")
        .replace("&#x2F;", "/")
        .replace("&#47;", "/")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
}
