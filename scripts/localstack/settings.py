"""Load ``airflow_settings.yaml`` (Astro CLI format) into the Airflow metadata DB.

``${NAME}`` placeholders are filled from ``.stack/stack.env``; a placeholder with no value is an
error rather than an empty field. Connections and variables are replaced, pools upserted, so
loading twice is harmless. Run as ``python -m scripts.localstack.settings`` with Airflow's env.
"""

from __future__ import annotations

import json
from string import Template

import yaml

from .config import REPO, stack_env


def load(path=REPO / "airflow_settings.yaml") -> dict:
    """Parse the settings file with placeholders filled."""
    try:
        text = Template(path.read_text()).substitute(stack_env())
    except KeyError as exc:
        raise SystemExit(f"{path}: no value for placeholder ${{{exc.args[0]}}}") from None
    return yaml.safe_load(text)["airflow"]


def apply(settings: dict) -> None:
    from airflow.models import Connection, Pool, Variable
    from airflow.utils.session import create_session

    with create_session() as session:
        for c in settings.get("connections") or []:
            session.query(Connection).filter(Connection.conn_id == c["conn_id"]).delete()
            extra = c.get("conn_extra")
            session.add(Connection(
                conn_id=c["conn_id"], conn_type=c["conn_type"], description=c.get("conn_description"),
                host=c.get("conn_host"), port=c.get("conn_port"), login=c.get("conn_login"),
                password=c.get("conn_password"), schema=c.get("conn_schema"),
                extra=json.dumps(extra) if extra else None,
            ))
        for p in settings.get("pools") or []:
            Pool.create_or_update_pool(p["pool_name"], p["pool_slot"], p.get("pool_description", ""),
                                       include_deferred=False, session=session)
    for v in settings.get("variables") or []:
        Variable.set(v["variable_name"], v["variable_value"])
    n = {k: len(settings.get(k) or []) for k in ("connections", "variables", "pools")}
    print(f"  airflow_settings.yaml loaded: {n['connections']} connections, {n['variables']} variables, "
          f"{n['pools']} pools")


if __name__ == "__main__":
    apply(load())
