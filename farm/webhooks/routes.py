"""``GET /.well-known/jwks.json``: the public keys that verify our webhook signatures."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from farm.config import get_settings
from farm.webhooks import signing

router = APIRouter(tags=["webhooks"])


class Jwk(BaseModel):
    kty: str = Field("OKP", description="Key type: OKP (octet key pair).")
    crv: str = Field("Ed25519", description="Curve: Ed25519.")
    x: str = Field(..., description="The raw 32-byte public key, base64url without padding.")
    kid: str = Field(..., description="Key id: the RFC 7638 thumbprint.")
    use: str = Field("sig", description="Use: signatures.")
    alg: str = Field("EdDSA", description="Algorithm: EdDSA.")


class Jwks(BaseModel):
    keys: list[Jwk]


@router.get(
    "/.well-known/jwks.json",
    response_model=Jwks,
    summary="Webhook signing keys (JWKS)",
    description=(
        "ED25519 public keys. A webhook carries `X-Fal-Webhook-Request-Id`, `-User-Id`, `-Timestamp` and "
        "`-Signature` (hex) over `request_id\\nuser_id\\ntimestamp\\nsha256_hex(body)`, as fal.ai's do."
    ),
)
def jwks() -> Jwks:
    return Jwks.model_validate(signing.jwks(get_settings()))
