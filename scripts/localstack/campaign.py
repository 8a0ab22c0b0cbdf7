"""Demo campaign data for the local stack: borehole simulations in MongoDB, one batch per day.

``campaigns.borehole`` gets 512 documents per day for the last 8 days (``day``: ISO date) plus a
fixed held-out set (``holdout: true``) that nightly retrains evaluate champion and challenger on.
Idempotent: documents carry a unique ``sample_id``; a second run inserts nothing.
"""

from __future__ import annotations

import datetime as dt

ROWS_PER_DAY = 512
DAYS = 8
HOLDOUT_ROWS = 512


def seed(mongo_uri: str = "mongodb://127.0.0.1:27017", today: dt.date | None = None) -> int:
    """Insert the missing demo documents; return how many were inserted."""
    import pymongo

    from hpctrain.data.borehole import make_table

    today = today or dt.date.today()
    coll = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=5000)["campaigns"]["borehole"]
    coll.create_index("sample_id", unique=True)
    batches = [("holdout", make_table(HOLDOUT_ROWS, seed=10_000), {"holdout": True, "day": "holdout"})]
    for back in range(DAYS):
        day = today - dt.timedelta(days=back)
        batches.append((day.isoformat(), make_table(ROWS_PER_DAY, seed=day.toordinal()),
                        {"holdout": False, "day": day.isoformat()}))
    inserted = 0
    for name, table, extra in batches:
        if coll.count_documents({"sample_id": f"{name}-0"}):
            continue
        docs = [{**row, **extra, "valid": True, "sample_id": f"{name}-{i}"}
                for i, row in enumerate(table.to_dict(orient="records"))]
        coll.insert_many(docs)
        inserted += len(docs)
    return inserted


if __name__ == "__main__":
    print(f"  campaign data: {seed()} documents inserted into campaigns.borehole")
