"""``python -m service.admin.passwords``: hash a dashboard password for ``CXR_DASHBOARD_USERS``."""

from __future__ import annotations

import json

import click

from service.admin.auth import hash_password


@click.command()
@click.option("--username", prompt=True, help="account name")
@click.option("--role", type=click.Choice(["admin", "viewer"]), default="viewer", show_default=True)
@click.password_option(help="the password (prompted twice when not given)")
def main(username: str, role: str, password: str) -> None:
    """Print one CXR_DASHBOARD_USERS entry with an argon2id hash of the password."""
    click.echo(json.dumps({"username": username, "password_hash": hash_password(password), "role": role}))


if __name__ == "__main__":
    main()
