"""Signing in to the board with Microsoft 365: OpenID Connect's authorisation-code flow
through msal (with PKCE and a nonce, which msal adds and checks).

The flow's state lives in Flask's signed session cookie between the redirect to Entra and
the callback; msal checks the ``state`` Entra returns against it, and the nonce in the ID
token. msal does not check the ID token's signature: the token comes straight from Entra's
token endpoint over TLS, in exchange for the code and our client secret, which OpenID
Connect (Core 3.1.3.7) accepts in place of a signature. What the spec still asks of the
client is checked here: the audience is our client id, the tenant is ours, the token has
not expired. The person is then matched to the staff directory by object id or by address
(never by display name) and must hold a board role.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msal
import requests
import structlog
from flask import Blueprint, abort, current_app, redirect, request, session
from werkzeug.wrappers import Response

from visitwatch.daemon.config import StaffMember
from visitwatch.daemon.web import sessions
from visitwatch.daemon.web.app import context_of
from visitwatch.daemon.web.context import WebContext

log = structlog.get_logger(__name__)

blueprint = Blueprint("microsoft", __name__)

CALLBACK = "/signin/microsoft/callback"
FLOW_KEY = "entra_flow"
# What msal needs back from the flow at the callback (its auth_uri would only bloat the cookie).
FLOW_FIELDS = ("state", "redirect_uri", "scope", "code_verifier", "nonce", "claims_challenge")
# Seconds each request to Entra may take; the sign-in page says so rather than hang.
TIMEOUT = 10
# The ID token claims that may name a directory entry, most stable first.
IDENTITY_CLAIMS = ("oid", "preferred_username", "email", "upn")
# Tenant placeholders that name no single organisation.
ANY_TENANT = frozenset({"common", "organizations", "consumers"})


def _context() -> WebContext:
    context = context_of(current_app)
    if "microsoft365" not in context.config.web.sign_in:
        abort(404)
    return context


def _application(context: WebContext) -> msal.ConfidentialClientApplication:
    """A fresh msal application for one request: nothing (no token of anyone's) is kept
    between sign-ins."""
    web = context.config.web
    secret = web.entra_client_secret
    authority = f"{web.entra_authority_host.rstrip('/')}/{web.entra_tenant_id}"
    return msal.ConfidentialClientApplication(
        web.entra_client_id,
        client_credential=secret.reveal() if secret is not None else None,
        authority=authority,
        instance_discovery=False,
        timeout=TIMEOUT,
    )


def _unreachable(err: Exception) -> Response:
    log.warning("entra_unreachable", error=type(err).__name__)
    abort(
        503,
        "Microsoft 365 sign-in could not reach Microsoft just now. Try again in a minute, "
        "or sign in with an e-mailed link if your organisation offers it.",
    )


@blueprint.get("/signin/microsoft")
def start() -> Response:
    context = _context()
    redirect_uri = context.config.daemon.public_base_url.rstrip("/") + CALLBACK
    try:
        flow = _application(context).initiate_auth_code_flow(scopes=[], redirect_uri=redirect_uri)
    except (requests.RequestException, ValueError) as err:
        return _unreachable(err)
    session[FLOW_KEY] = {k: flow[k] for k in FLOW_FIELDS if k in flow}
    return redirect(flow["auth_uri"], 303)


@blueprint.get(CALLBACK)
def callback() -> Response:
    context = _context()
    flow = session.pop(FLOW_KEY, None)
    if not isinstance(flow, dict):
        abort(400, "This sign-in was not started here, or took too long. Start again.")
    try:
        result = _application(context).acquire_token_by_auth_code_flow(flow, request.args.to_dict())
    except ValueError:
        # msal: the state Entra returned is not the one this browser started with.
        abort(400, "This sign-in does not match the one started in this browser. Start again.")
    except RuntimeError:
        abort(400, "Microsoft 365 returned a sign-in for another request. Start again.")
    except requests.RequestException as err:
        return _unreachable(err)
    if "error" in result:
        log.info("entra_sign_in_refused", error=result.get("error"))
        abort(403, "Microsoft 365 did not sign you in. Start again, or ask your admin.")
    claims = result.get("id_token_claims") or {}
    problem = _claims_problem(context, claims)
    if problem:
        log.warning("entra_id_token_refused", problem=problem)
        abort(403, "Microsoft 365 returned a sign-in this board cannot accept. Start again.")
    member = staff_for(context, claims)
    if member is None or not sessions.may_open_board(context, member):
        log.info("entra_sign_in_not_allowed", known=member is not None)
        abort(
            403,
            "You are signed in to Microsoft 365, but your account is not among the staff "
            "who may open the board. Ask your visitwatch admin.",
        )
    log.info("signed_in", method="microsoft365")
    return sessions.welcome(context, member)


def _claims_problem(context: WebContext, claims: Mapping[str, Any]) -> str:
    """What is wrong with the ID token's claims for us, or ""."""
    web = context.config.web
    audience = claims.get("aud")
    audiences = audience if isinstance(audience, list) else [audience]
    if web.entra_client_id not in audiences:
        return "audience"
    tenant = web.entra_tenant_id.lower()
    if tenant in ANY_TENANT:
        return "tenant"  # the board is for one organisation: name its tenant
    # A tenant given by domain name is not compared: the tenant's own token endpoint
    # answered, which only signs in its own users and guests.
    if "." not in tenant and str(claims.get("tid", "")).lower() != tenant:
        return "tenant"
    try:
        expires = int(claims.get("exp", 0))
    except (TypeError, ValueError):
        return "expiry"
    if expires <= context.clock.now().timestamp():
        return "expired"
    return ""


def staff_for(context: WebContext, claims: Mapping[str, Any]) -> StaffMember | None:
    """The directory entry the ID token names: by id, or by e-mail address, ignoring case."""
    directory = context.watcher.staff.current
    for claim in IDENTITY_CLAIMS:
        value = str(claims.get(claim) or "").strip().lower()
        if not value:
            continue
        member = directory.get(value) or next(
            (m for m in directory.members.values() if m.email.lower() == value), None
        )
        if member is not None:
            return member
    return None
