"""Make coturn's SQLite user database hold exactly the given TURN REST API secrets for one realm.

Installed by the starling.mesh.relay role. The secrets are read from stdin (a JSON list, never from the
command line, which other users can see); the result is one JSON object on stdout with counts only:
{"changed": bool, "added": N, "removed": N, "count": N}.

coturn (``use-auth-secret`` without ``static-auth-secret``) reads the ``turn_secret`` table on every
authentication, so the change takes effect at once, without a restart. New secrets are inserted before
old ones are deleted, in one transaction: coturn sees either the old set or the new one, never an
empty or partial one. ``turnadmin -S -r REALM -b DB`` shows the same table.

Usage: turn-secrets --db PATH --realm REALM [--check] < secrets.json
"""

import argparse
import json
import os
import sqlite3
import sys

# coturn's own schema (turnadmin/turnserver create these when they make a new database).
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS turnusers_lt ( realm varchar(127) default '', name varchar(512),"
    " hmackey char(128), PRIMARY KEY (realm,name))",
    "CREATE TABLE IF NOT EXISTS turn_secret (realm varchar(127) default '', value varchar(127),"
    " primary key (realm,value))",
    "CREATE TABLE IF NOT EXISTS allowed_peer_ip (realm varchar(127) default '', ip_range varchar(256),"
    " primary key (realm,ip_range))",
    "CREATE TABLE IF NOT EXISTS denied_peer_ip (realm varchar(127) default '', ip_range varchar(256),"
    " primary key (realm,ip_range))",
    "CREATE TABLE IF NOT EXISTS turn_origin_to_realm (origin varchar(127),realm varchar(127),primary key (origin))",
    "CREATE TABLE IF NOT EXISTS turn_realm_option (realm varchar(127) default '', opt varchar(32),"
    " value varchar(128), primary key (realm,opt))",
    "CREATE TABLE IF NOT EXISTS oauth_key (kid varchar(128),ikm_key varchar(256),timestamp bigint default 0,"
    "lifetime integer default 0,as_rs_alg varchar(64) default '',realm varchar(127) default '',primary key (kid))",
    "CREATE TABLE IF NOT EXISTS admin_user (name varchar(32), realm varchar(127), password varchar(127),"
    " primary key (name))",
)


def fail(message):
    print(json.dumps({"failed": True, "msg": message}))
    return 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--realm", required=True)
    parser.add_argument("--check", action="store_true", help="report what would change, change nothing")
    args = parser.parse_args(argv)

    try:
        wanted = json.load(sys.stdin)
    except ValueError:
        return fail("stdin is not a JSON list of secrets")
    if not isinstance(wanted, list) or not wanted or not all(isinstance(s, str) and s for s in wanted):
        return fail("stdin must be a non-empty JSON list of non-empty strings")
    if any(len(s) > 127 for s in wanted):  # coturn's column is varchar(127)
        return fail("a TURN secret is longer than 127 characters")

    exists = os.path.exists(args.db)
    if args.check and not exists:
        print(json.dumps({"changed": True, "added": len(set(wanted)), "removed": 0, "count": len(set(wanted))}))
        return 0
    try:
        db = sqlite3.connect(args.db, timeout=30, isolation_level=None)
    except sqlite3.Error as exc:
        return fail("cannot open %s: %s" % (args.db, exc))
    try:
        db.execute("BEGIN" if args.check else "BEGIN IMMEDIATE")
        if not args.check:
            for statement in SCHEMA:
                db.execute(statement)
        table = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'turn_secret'").fetchone()
        query = "SELECT value FROM turn_secret WHERE realm = ?"
        present = {row[0] for row in db.execute(query, (args.realm,))} if table else set()
        add = [s for s in dict.fromkeys(wanted) if s not in present]
        remove = [s for s in present if s not in set(wanted)]
        if not args.check:
            db.executemany("INSERT INTO turn_secret (realm, value) VALUES (?, ?)", [(args.realm, s) for s in add])
            db.executemany("DELETE FROM turn_secret WHERE realm = ? AND value = ?", [(args.realm, s) for s in remove])
        db.execute("ROLLBACK" if args.check else "COMMIT")
    except sqlite3.Error as exc:
        return fail("%s: %s" % (args.db, exc))
    finally:
        db.close()
    result = {"changed": bool(add or remove), "added": len(add), "removed": len(remove), "count": len(set(wanted))}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
