"""Test infrastructure: the real parts the tests drive (nginx, curl, openssl, the agent).

Nothing here is mocked. ``pki`` makes a throw-away PKI with ``cryptography``
(and the legacy PKCS#12 with the real ``openssl``), ``nginx`` runs a real nginx
that demands client certificates, ``agent`` runs the product's own console
scripts as a user would, and ``tools`` finds outside programs: a missing one
skips a test on a developer's machine and fails it under CI.

Import as ``from support.nginx import Nginx`` (pytest puts ``tests/`` on the
path because ``tests/`` is not a package).
"""
