"""
patroni_proxy: a role-aware TCP proxy in front of a Patroni cluster.

It asks Patroni's REST API who is leader, sync standby or async replica and forwards each new
TCP connection to a member of the role its port serves, without parsing the bytes; a topology
change closes only the connections to members that stopped being eligible.

  - L{pgdoorman.patroni.cluster}: the C{/cluster} client and member eligibility (reusable by
    pgdoorman's own Patroni-assisted fallback).
  - L{pgdoorman.patroni.proxy}: per-port routing, the relay, the per-cluster poller.
  - L{pgdoorman.patroni.api}: the HTTP API and Prometheus metrics.
  - L{pgdoorman.patroni.config}: the YAML file; L{pgdoorman.patroni.service}: the whole
    program as a Twisted service; L{pgdoorman.patroni.cli}, L{pgdoorman.patroni.tap}: how to
    run it.
"""
