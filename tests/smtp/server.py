#!/usr/bin/env python3
"""A real SMTP server for outboxd's integration tests, built on aiosmtpd.

Listens on 127.0.0.1:PORT and prints, one JSON object per line on stdout:
  {"ready": PORT}                          once it accepts connections
  {"mail_from": ..., "rcpt_tos": [...],    for each accepted message, with the
   "subject": ..., "to": ..., "from": ...,  message parsed by Python's email
   "content_type": ..., "parts": {...},     package (a real MIME parser), and
   "defects": [...], "raw": ...}            the raw data for secret checks
Recipients given with --refuse get 550, with --defer 450. With --user and
--password, AUTH (PLAIN or LOGIN) is required and checked. --delay-rcpt and
--delay-data SECONDS make a slow server: each answer to RCPT, and each final
answer to DATA (after the message's closing dot), comes that much later. The
wait is an asyncio.sleep, so other sessions go on meanwhile; a message is
printed when its 250 is sent, as a real server would have accepted it then
(also when the client gave up waiting).
Refusals of us rather than of a recipient: --refuse-sender answers MAIL FROM
with 553 until the server gets SIGUSR1 (then it accepts the sender as usual);
--size-limit BYTES answers a longer message with 552 (aiosmtpd's own limit,
also advertised as SIZE in EHLO); --refuse-data answers every message with
554. The refusals of MAIL FROM and --refuse-data are printed as
{"refused": "MAIL FROM" | "DATA"}.
--hang-rcpt ADDRESS never answers RCPT TO for that address (a relay that
stalls mid-exchange), printing {"hanging": ADDRESS} when it starts to.
"""
import argparse
import asyncio
import email
import email.policy
import json
import signal
import sys
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Handler:
    def __init__(self, refuse, defer, delay_rcpt=0.0, delay_data=0.0,
                 refuse_sender=False, refuse_data=False, hang_rcpt=()):
        self.refuse = set(refuse)
        self.hang_rcpt = set(hang_rcpt)
        self.defer = set(defer)
        self.delay_rcpt = delay_rcpt
        self.delay_data = delay_data
        self.refuse_sender = refuse_sender
        self.refuse_data = refuse_data
        self.lock = threading.Lock()

    def report(self, record):
        with self.lock:
            print(json.dumps(record), flush=True)

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.refuse_sender:
            self.report({"refused": "MAIL FROM"})
            return "553 5.7.1 sender address not permitted"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.delay_rcpt > 0:
            await asyncio.sleep(self.delay_rcpt)
        if address in self.hang_rcpt:
            self.report({"hanging": address})
            await asyncio.Event().wait()
        if address in self.refuse:
            return "550 5.1.1 mailbox unavailable"
        if address in self.defer:
            return "450 4.2.1 mailbox busy, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.delay_data > 0:
            await asyncio.sleep(self.delay_data)
        if self.refuse_data:
            self.report({"refused": "DATA"})
            return "554 5.6.0 message content rejected"
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
        self.report(record)
        return "250 2.0.0 accepted"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--refuse", action="append", default=[])
    ap.add_argument("--defer", action="append", default=[])
    ap.add_argument("--hang-rcpt", action="append", default=[])
    ap.add_argument("--user")
    ap.add_argument("--password")
    ap.add_argument("--delay-rcpt", type=float, default=0.0, metavar="SECONDS")
    ap.add_argument("--delay-data", type=float, default=0.0, metavar="SECONDS")
    ap.add_argument("--refuse-sender", action="store_true")
    ap.add_argument("--refuse-data", action="store_true")
    ap.add_argument("--size-limit", type=int, metavar="BYTES")
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

    if args.size_limit:
        kwargs["data_size_limit"] = args.size_limit
    handler = Handler(args.refuse, args.defer, args.delay_rcpt, args.delay_data,
                      args.refuse_sender, args.refuse_data, args.hang_rcpt)
    controller = Controller(handler, hostname="127.0.0.1", port=args.port, **kwargs)
    controller.start()
    print(json.dumps({"ready": args.port}), flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: setattr(handler, "refuse_sender", False))
    # Also stop when the test process goes away and closes our stdin.
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    stop.wait()
    controller.stop()


if __name__ == "__main__":
    main()
