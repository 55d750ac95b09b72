#!/usr/bin/env python3
"""Logs in once through Envoy + portcullis at a real OpenID Provider (tests/oidc/provider.mjs,
panva's oidc-provider with its dev login form) and prints the Cookie header value that carries
the resulting portcullis session, for load.sh's session-cookie rows.

    oidc_login.py START_URL OP_ISSUER LOGIN

START_URL is a protected URL behind Envoy on a route with openid-connect's code flow. The walk
is what a browser does: follow redirects, keep each origin's cookies apart (cookies ignore ports,
but the OP and Envoy are different sites here), fill in the OP's login and consent forms.
Only 127.0.0.1 is ever contacted; anything else is an error.
"""
import html
import http.client
import re
import sys
import urllib.parse

MAX_STEPS = 20


def origin(url):
    u = urllib.parse.urlsplit(url)
    if u.hostname != "127.0.0.1":
        sys.exit(f"oidc_login.py: refusing to contact {u.hostname} (only 127.0.0.1)")
    return u.port


def request(method, url, jar, form=None):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection("127.0.0.1", origin(url), timeout=10)
    headers = {"accept": "text/html"}
    cookies = jar.setdefault(u.port, {})
    if cookies:
        headers["cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    body = None
    if form is not None:
        body = urllib.parse.urlencode(form)
        headers["content-type"] = "application/x-www-form-urlencoded"
    conn.request(method, u.path + (f"?{u.query}" if u.query else ""), body, headers)
    resp = conn.getresponse()
    page = resp.read().decode("utf-8", "replace")
    for name, value in resp.getheaders():
        if name.lower() != "set-cookie":
            continue
        pair, _, attrs = value.partition(";")
        key, _, val = pair.strip().partition("=")
        gone = re.search(r"max-age=0\b|expires=thu, 01 jan 1970", attrs, re.I)
        if gone:
            cookies.pop(key, None)
        else:
            cookies[key] = val
    location = resp.getheader("location")
    return resp.status, (urllib.parse.urljoin(url, location) if location else None), page


def main():
    start, issuer, login = sys.argv[1:4]
    app = origin(start)
    jar = {}
    step = ("GET", start, None)
    for _ in range(MAX_STEPS):
        method, url, form = step
        status, location, page = request(method, url, jar, form)
        if status in (301, 302, 303, 307, 308):
            if origin(location) == app and not url.startswith(issuer) and url != start:
                # Back at the application after the callback: the session is set.
                break
            step = ("GET", location, None)
            continue
        if status != 200:
            sys.exit(f"oidc_login.py: {url} answered {status}:\n{page[:400]}")
        if origin(url) == app:
            break
        action = re.search(r'<form[^>]*action="([^"]+)"', page)
        if not action:
            sys.exit(f"oidc_login.py: no form at {url}:\n{page[:400]}")
        target = urllib.parse.urljoin(url, html.unescape(action.group(1)))
        if 'name="prompt" value="login"' in page:
            fields = {"prompt": "login", "login": login, "password": "any password"}
        elif 'name="prompt" value="consent"' in page:
            fields = {"prompt": "consent"}
        else:
            sys.exit(f"oidc_login.py: unexpected page at {url}:\n{page[:400]}")
        step = ("POST", target, fields)
    else:
        sys.exit(f"oidc_login.py: the login did not finish in {MAX_STEPS} steps")
    session = {k: v for k, v in jar.get(app, {}).items() if not k.endswith("_login")}
    if not session:
        sys.exit("oidc_login.py: the login finished without a session cookie")
    print("; ".join(f"{k}={v}" for k, v in session.items()))


if __name__ == "__main__":
    main()
