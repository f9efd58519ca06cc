"""exporter-toolkit's TLS settings, spelled as Go's crypto/tls spells them, mapped onto Python's
ssl (OpenSSL). Pure: the names in, the OpenSSL names out, or a ValueError that says why not.

- ``min_version``/``max_version``: TLS12 and TLS13. TLS10 and TLS11 are refused: Python's ssl
  deprecates them and OpenSSL 3 disables them at its default security level, so a config that
  asks for them would not get what it says.
- ``cipher_suites``: the names Go lists as secure (``tls.CipherSuites()``, which is what
  exporter-toolkit accepts), including the RSA key-exchange suites older Go versions list there.
  Go's insecure ones (RC4, 3DES, CBC-SHA256) are refused as exporter-toolkit refuses them. The
  TLS 1.3 suites are accepted and change nothing, as in Go: neither Go nor Python's ssl lets
  them be chosen, all three are always on.
- ``curve_preferences``: one curve. Python's ssl sets a single group
  (``SSLContext.set_ecdh_curve``, for TLS 1.2 and 1.3 alike) and has no call for a list, so a
  list of several is refused rather than cut to its first entry.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence

VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_ORDER = ("TLS10", "TLS11", "TLS12", "TLS13")

# Go name -> OpenSSL name (TLS 1.0-1.2 suites).
CIPHERS = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
TLS13_SUITES = frozenset(
    {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
)
GO_INSECURE = frozenset(
    {
        "TLS_RSA_WITH_RC4_128_SHA",
        "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
        "TLS_RSA_WITH_AES_128_CBC_SHA256",
        "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA",
        "TLS_ECDHE_RSA_WITH_RC4_128_SHA",
        "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA",
        "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
        "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
    }
)
# Go name -> OpenSSL group name.
CURVES = {
    "CurveP256": "prime256v1",
    "CurveP384": "secp384r1",
    "CurveP521": "secp521r1",
    "X25519": "X25519",
}


def offered_version(name: str) -> str:
    """TLS12 or TLS13; TLS10 and TLS11 refused with the reason."""
    if name not in VERSIONS:
        raise ValueError(
            f"{name} is not offered: Python's ssl deprecates TLS 1.0 and 1.1 and OpenSSL 3 "
            "refuses them at its default security level; use TLS12 or TLS13"
        )
    return name


def version_order(minimum: str, maximum: str) -> None:
    if _ORDER.index(minimum) > _ORDER.index(maximum):
        raise ValueError(f"min_version {minimum} is above max_version {maximum}")


def openssl_ciphers(names: Sequence[str]) -> list[str]:
    """The OpenSSL names of the TLS 1.2 suites among ``names`` (TLS 1.3 names are checked and
    dropped: they are always on)."""
    out = []
    for name in names:
        if name in TLS13_SUITES:
            continue
        if name in GO_INSECURE:
            raise ValueError(
                f"{name} is one of Go's insecure cipher suites, which exporter-toolkit refuses too"
            )
        if name not in CIPHERS:
            raise ValueError(
                f"unknown cipher suite {name!r}: use Go's names, "
                "e.g. TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"
            )
        out.append(CIPHERS[name])
    return out


def openssl_curve(names: Sequence[str]) -> str | None:
    """The one OpenSSL group ``names`` asks for, or None (OpenSSL's defaults)."""
    for name in names:
        if name not in CURVES:
            raise ValueError(f"unknown curve {name!r}: one of {', '.join(CURVES)}")
    if len(names) > 1:
        raise ValueError(
            "Python's ssl sets one curve, not a preference list: list one, or leave "
            "curve_preferences out for OpenSSL's defaults (X25519, P-256, X448, P-521, P-384)"
        )
    return CURVES[names[0]] if names else None
