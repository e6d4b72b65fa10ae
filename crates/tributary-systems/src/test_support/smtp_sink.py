"""A test SMTP relay for email-queue-system (aiosmtpd). Answers by recipient local part:

  hard...@    RCPT 550 5.1.1 (user unknown)          full...@   RCPT 552 5.2.2 (mailbox full)
  spam...@    end of DATA 550 5.7.1 (policy)         never...@  RCPT 451 4.4.1 every time
  later-N-...@  RCPT 451 4.3.0 the first N times, then accepted
  slow-MS-...@  RCPT answered 250 after MS milliseconds
  anything else: accepted (250).

Every accepted message is printed to stdout as one JSON line; "READY" is printed once listening.
Usage: python3 smtp_sink.py PORT
"""
import asyncio
import email
import json
import re
import sys
import time

from aiosmtpd.controller import Controller

seen = {}


class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@", 1)[0].lower()
        if local.startswith("hard"):
            return "550 5.1.1 <%s>: Recipient address rejected: User unknown" % address
        if local.startswith("full"):
            return "552 5.2.2 <%s>: Mailbox full" % address
        if local.startswith("never"):
            return "451 4.4.1 Try again later"
        slow = re.match(r"slow-(\d+)-", local)
        if slow:
            await asyncio.sleep(int(slow.group(1)) / 1000)
        match = re.match(r"later-(\d+)-", local)
        if match:
            count = seen.get(address, 0)
            seen[address] = count + 1
            if count < int(match.group(1)):
                return "451 4.3.0 Greylisted, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if any(r.split("@", 1)[0].lower().startswith("spam") for r in envelope.rcpt_tos):
            return "550 5.7.1 Message rejected as spam"
        message = email.message_from_bytes(envelope.content)
        print(json.dumps({
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "id": message.get("X-Tributary-Email-Id"),
            "message_id": message.get("Message-ID"),
            "subject": message.get("Subject"),
            "headers": {k: v for k, v in message.items() if k.lower().startswith("x-") or k.lower().startswith("list-")},
        }), flush=True)
        return "250 2.0.0 OK queued"


controller = Controller(Handler(), hostname="127.0.0.1", port=int(sys.argv[1]))
controller.start()
print("READY", flush=True)
while True:
    time.sleep(3600)
