#!/usr/bin/env python3
"""A real SMTP server for outboxd's integration tests, built on aiosmtpd.

Listens on 127.0.0.1:PORT and prints, one JSON object per line on stdout:
  {"ready": PORT}                          once it accepts connections
  {"mail_from": ..., "rcpt_tos": [...],    for each accepted message, with the
   "subject": ..., "to": ..., "from": ...,  message parsed by Python's email
   "content_type": ..., "parts": {...},     package (a real MIME parser), and
   "defects": [...], "raw": ...}            the raw data for secret checks
Recipients given with --refuse get 550, with --defer 450. With --user and
--password, AUTH (PLAIN or LOGIN) is required and checked.
"""
import argparse
import email
import email.policy
import json
import signal
import sys
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Handler:
    def __init__(self, refuse, defer):
        self.refuse = set(refuse)
        self.defer = set(defer)
        self.lock = threading.Lock()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse:
            return "550 5.1.1 mailbox unavailable"
        if address in self.defer:
            return "450 4.2.1 mailbox busy, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        raw = envelope.original_content or envelope.content
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        parts = {}
        defects = [str(d) for d in msg.defects]
        for part in msg.walk():
            defects.extend(str(d) for d in part.defects)
            if not part.is_multipart():
                parts[part.get_content_type()] = part.get_content()
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "subject": str(msg["subject"]),
            "to": str(msg["to"]),
            "from": str(msg["from"]),
            "content_type": msg.get_content_type(),
            "parts": parts,
            "defects": defects,
            "raw": raw.decode("utf-8", "replace"),
        }
        with self.lock:
            print(json.dumps(record), flush=True)
        return "250 2.0.0 accepted"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--refuse", action="append", default=[])
    ap.add_argument("--defer", action="append", default=[])
    ap.add_argument("--user")
    ap.add_argument("--password")
    args = ap.parse_args()

    kwargs = {}
    if args.user:
        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (
                isinstance(auth_data, LoginPassword)
                and auth_data.login.decode() == args.user
                and auth_data.password.decode() == args.password
            )
            return AuthResult(success=ok)

        kwargs = {"authenticator": authenticator, "auth_required": True, "auth_require_tls": False}

    controller = Controller(
        Handler(args.refuse, args.defer), hostname="127.0.0.1", port=args.port, **kwargs
    )
    controller.start()
    print(json.dumps({"ready": args.port}), flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # Also stop when the test process goes away and closes our stdin.
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    stop.wait()
    controller.stop()


if __name__ == "__main__":
    main()
