#!/usr/bin/env python3
"""Derives the load benchmark's Envoy config from the shipped envoy/envoy.yaml.

    envoy_config.py SHIPPED.yaml OUT.yaml ADMIN UPSTREAM GRPC PLAIN JWTN AUTHZ HS_JWKS \
        CANNED_GRPC CANNED

Four listeners that differ only in their HTTP filters, so the rows compare the
auth step and nothing else:
  ext_authz  the shipped `front` listener as is (ext_authz → portcullis);
  plain      the same listener without ext_authz (Envoy, no auth);
  jwt_authn  the same listener with Envoy's native jwt_authn (HS256, inline JWKS)
             in place of ext_authz;
  canned     the shipped listener with its ext_authz filter calling, instead of
             portcullis, a server that answers every Check with the same stored OK
             CheckResponse (nginx): what the ext_authz hop costs with a real
             server that decides nothing.
Clusters (upstream, portcullis with the shipped HTTP/2 settings) are kept; only
ports change. The canned cluster is a copy of the portcullis cluster, so Envoy
treats both servers alike.
"""
import copy
import sys

import yaml


def set_port(sockaddr_holder, port):
    sockaddr_holder["socket_address"]["port_value"] = int(port)


def main(argv):
    shipped, out, admin, upstream, grpc, plain, jwtn, authz, hs_jwks, canned_grpc, canned = argv[1:12]
    cfg = yaml.safe_load(open(shipped))
    set_port(cfg["admin"]["address"], admin)
    for cluster in cfg["static_resources"]["clusters"]:
        port = {"upstream": upstream, "portcullis": grpc}[cluster["name"]]
        for ep in cluster["load_assignment"]["endpoints"]:
            for lb in ep["lb_endpoints"]:
                set_port(lb["endpoint"]["address"], port)

    (front,) = [l for l in cfg["static_resources"]["listeners"] if l["name"] == "front"]
    (portcullis,) = [c for c in cfg["static_resources"]["clusters"] if c["name"] == "portcullis"]
    canned_cluster = copy.deepcopy(portcullis)
    canned_cluster["name"] = "canned"
    canned_cluster["load_assignment"]["cluster_name"] = "canned"
    for ep in canned_cluster["load_assignment"]["endpoints"]:
        for lb in ep["lb_endpoints"]:
            set_port(lb["endpoint"]["address"], canned_grpc)
    cfg["static_resources"]["clusters"].append(canned_cluster)

    def variant(name, port, replace_authz):
        """A copy of `front` whose ext_authz filter (a copy too) is replaced by the
        filters `replace_authz` returns for it."""
        lst = copy.deepcopy(front)
        lst["name"] = name
        set_port(lst["address"], port)
        for chain in lst["filter_chains"]:
            for f in chain["filters"]:
                hcm = f["typed_config"]
                hcm["stat_prefix"] = name
                filters = []
                for hf in hcm["http_filters"]:
                    if hf["name"] == "envoy.filters.http.ext_authz":
                        filters.extend(replace_authz(hf))
                    else:
                        filters.append(hf)
                hcm["http_filters"] = filters
        return lst

    jwt_authn = {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {
                "bench": {
                    "issuer": "bench",
                    "forward": True,
                    "local_jwks": {"inline_string": hs_jwks},
                }
            },
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "bench"}}],
        },
    }
    authz_listener = copy.deepcopy(front)
    authz_listener["name"] = "ext_authz"
    set_port(authz_listener["address"], authz)

    def calling_canned(authz_filter):
        authz_filter["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = "canned"
        return [authz_filter]

    cfg["static_resources"]["listeners"] = [
        variant("plain", plain, lambda _: []),
        variant("jwt_authn", jwtn, lambda _: [jwt_authn]),
        authz_listener,
        variant("canned", canned, calling_canned),
    ]
    with open(out, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


if __name__ == "__main__":
    main(sys.argv)
