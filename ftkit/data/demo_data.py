"""A deterministic generator of AcmeCorp customer-support exchanges: ftkit's embedded demo data.

It writes what a company's helpdesk export looks like: a CSV with one row per exchange
(``conversation_id, turn, channel, ticket, reply``), some conversations of two turns, and a
little of the dirt real exports have (stray whitespace, a few duplicated rows, a few rows with
no reply). Every reply is in one house voice, which a base model does not have:

* at most three sentences, then the fixed sign-off line ``— AcmeCorp Support``;
* a concrete next step;
* the order number repeated whenever the customer gives one (``AC-`` and six digits).

The variety (14 intents, 24 products, several phrasings, greetings and closers per intent,
random order numbers and details) makes held-out tickets new combinations, so a held-out split
measures generalisation rather than recall.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

SIGN_OFF = "— AcmeCorp Support"
ORDER_PATTERN = r"AC-\d{6}"

PRODUCTS = [
    "TrailLite 2 tent", "Summit 45L backpack", "AeroBrew coffee grinder", "NimbusPro air purifier",
    "FlexiDesk standing desk", "GlowMate bedside lamp", "HydroPeak water bottle", "RidgeRunner hiking boots",
    "CozyNest sleeping bag", "SwiftChop kitchen knife set", "BreezeMax tower fan", "PureFlow water filter",
    "ZenSeat office chair", "StormShell rain jacket", "EmberGrill camping stove", "ClearView binoculars",
    "PowerPack 20000 power bank", "SnapFold camping chair", "ThermoCup travel mug", "QuietStep treadmill",
    "AquaSprout plant waterer", "LumaBeam headlamp", "FrostBox cooler", "StrideFit yoga mat",
]
CITIES = ["Leeds", "Denver", "Lyon", "Austin", "Porto", "Graz", "Utrecht", "Boise", "Cork", "Turin"]
CARRIERS = ["UPS", "DHL", "FedEx"]
GREETINGS = ["", "Hi,", "Hello,", "Hi there,", "Hey team,", "Good morning,", "Dear AcmeCorp,"]
CLOSERS = ["", "", "Thanks.", "Thank you!", "Please help.", "Thanks in advance.", "This is urgent.", "Any update?"]


def _order() -> str:
    return "AC-" + "".join(str(_R.randint(0, 9)) for _ in range(6))


_R = random.Random(0)  # replaced per call in generate(); module-level only so helpers stay short


def _ref(order: str | None, with_order: str, without: str) -> str:
    return with_order.format(order=order) if order else without


# Each intent: customer phrasings (may use {product}, {order_part}, {days}, {city}) and a reply
# builder returning at most three sentences with a concrete next step.
def _reply_status(o, p, d):
    return _R.choice([
        _ref(o, "Order {order} left our warehouse and is with " + d["carrier"] + ".",
             "I can check that for you right away."),
        _ref(o, "I checked order {order} and it is on its way with " + d["carrier"] + ".",
             "I'd be glad to look up your delivery."),
    ]) + " " + _ref(o, "You can track it with the link in your shipping email; it should arrive within 3 business days.",
                    "Please reply with your order number (it starts with AC-) and I'll send you the tracking link.")


def _reply_delay(o, p, d):
    return _ref(o, "I'm sorry order {order} is running late.", "I'm sorry your delivery is running late.") + " " + _ref(
        o, "I've asked " + d["carrier"] + " to prioritise it and you'll get an update by email within 24 hours.",
        "Please reply with your order number (it starts with AC-) so I can chase the carrier today.")


def _reply_damaged(o, p, d):
    return f"I'm sorry your {p} arrived damaged." + " " + _ref(
        o, "Please reply with a photo of the damage and I'll ship a free replacement for order {order} the same day.",
        "Please reply with your order number (it starts with AC-) and a photo of the damage, and I'll ship a free replacement.")


def _reply_wrong(o, p, d):
    return "I'm sorry we sent the wrong item." + " " + _ref(
        o, f"I've arranged for the correct {p} to ship for order {{order}} today, and a prepaid return label is on its way by email.",
        f"Please reply with your order number (it starts with AC-) and I'll ship the correct {p} today.")


def _reply_return(o, p, d):
    return f"You can return the {p} within 30 days for a full refund." + " " + _ref(
        o, "I've emailed a prepaid return label for order {order}; drop the parcel at any " + d["carrier"] + " point.",
        "Please reply with your order number (it starts with AC-) and I'll email you a prepaid return label.")


def _reply_refund(o, p, d):
    return _ref(o, "The refund for order {order} was approved.", "Refunds are issued once the return reaches our warehouse.") + " " + _ref(
        o, "It will reach your original payment method within 5 business days.",
        "Please reply with your order number (it starts with AC-) and I'll confirm the refund date.")


def _reply_cancel(o, p, d):
    return _ref(o, "I've cancelled order {order} before it shipped.", "I can cancel an order that has not shipped yet.") + " " + _ref(
        o, "You'll receive a confirmation email and the full refund within 3 business days.",
        "Please reply with your order number (it starts with AC-) and I'll cancel it right away.")


def _reply_address(o, p, d):
    return _ref(o, f"I've updated the delivery address for order {{order}} to your address in {d['city']}.",
                f"I can change the delivery address to {d['city']} if the order has not shipped.") + " " + _ref(
        o, "You'll get a confirmation email within the hour.",
        "Please reply with your order number (it starts with AC-) and the full new address.")


def _reply_payment(o, p, d):
    return "I'm sorry your payment didn't go through." + " " + _ref(
        o, "Order {order} is on hold for 48 hours, so please retry the payment from the link in your order email.",
        "Please try another card or PayPal at checkout, and reply here if it fails again.")


def _reply_invoice(o, p, d):
    return _ref(o, "I've emailed the invoice for order {order} to the address on your account.",
                "I can send you an invoice for any order.") + " " + _ref(
        o, "If you need a company name or VAT number on it, reply with the details.",
        "Please reply with your order number (it starts with AC-) and I'll email the invoice.")


def _reply_warranty(o, p, d):
    return f"Your {p} has a 2-year warranty." + " " + _ref(
        o, "I've opened a warranty claim for order {order}; please reply with a short video of the fault so we can ship a replacement.",
        "Please reply with your order number (it starts with AC-) and a short video of the fault to start a claim.")


def _reply_compat(o, p, d):
    return f"Yes, the {p} works with the accessories listed on its product page." + " " + (
        "If you tell me which item you have in mind, I'll confirm it before you order.")


def _reply_password(o, p, d):
    return "You can reset your password from the 'Forgot password' link on the sign-in page." + " " + (
        "If the email doesn't arrive within 10 minutes, check your spam folder or reply here and I'll send it manually.")


def _reply_discount(o, p, d):
    return "I'm sorry the discount code didn't work." + " " + _ref(
        o, "I've applied the 10% discount to order {order} and the difference will be refunded within 5 business days.",
        "Please reply with the code and your order number (it starts with AC-) and I'll apply it manually.")


INTENTS = {
    "order_status": (["Where is my {product}? {order_part}", "Can you tell me the status of {order_part_lc}?",
                      "I ordered a {product} and want to know when it ships. {order_part}",
                      "Has my {product} shipped yet? {order_part}", "Tracking for {order_part_lc}, please."],
                     _reply_status, 0.75),
    "delivery_delay": (["My {product} was supposed to arrive {days} days ago. {order_part}",
                        "Still waiting for my {product}, it's {days} days late. {order_part}",
                        "The delivery of {order_part_lc} is late by {days} days."], _reply_delay, 0.7),
    "damaged_item": (["My {product} arrived broken. {order_part}", "The box was crushed and the {product} is damaged. {order_part}",
                      "I received a damaged {product}. {order_part}"], _reply_damaged, 0.7),
    "wrong_item": (["I ordered a {product} but received something else. {order_part}",
                    "Wrong item in my parcel, I wanted the {product}. {order_part}"], _reply_wrong, 0.7),
    "return_request": (["I'd like to return my {product}. {order_part}", "How do I send back the {product}? {order_part}",
                        "The {product} doesn't fit my needs, can I return it? {order_part}"], _reply_return, 0.6),
    "refund_status": (["When will I get my refund for the {product}? {order_part}",
                       "I returned the {product} {days} days ago and have no refund yet. {order_part}"], _reply_refund, 0.7),
    "cancel_order": (["Please cancel my order for the {product}. {order_part}", "I want to cancel {order_part_lc}.",
                      "Changed my mind about the {product}, cancel it please. {order_part}"], _reply_cancel, 0.7),
    "change_address": (["I moved to {city}, can you change the delivery address? {order_part}",
                        "Please ship my {product} to my new address in {city}. {order_part}"], _reply_address, 0.6),
    "payment_failed": (["My card was declined when buying the {product}. {order_part}",
                        "Payment failed twice for the {product}. {order_part}"], _reply_payment, 0.4),
    "invoice_request": (["I need an invoice for my {product}. {order_part}", "Can you send me a receipt for {order_part_lc}?"],
                        _reply_invoice, 0.7),
    "warranty_claim": (["My {product} stopped working after {days} weeks. {order_part}",
                        "Is the {product} under warranty? It broke. {order_part}"], _reply_warranty, 0.5),
    "product_question": (["Does the {product} work with other AcmeCorp accessories?",
                          "Before I buy the {product}, is it compatible with my current gear?"], _reply_compat, 0.0),
    "password_reset": (["I can't log in to my account.", "I forgot my password, how do I reset it?",
                        "The password reset email never came."], _reply_password, 0.0),
    "discount_code": (["My discount code didn't apply to the {product}. {order_part}",
                       "The promo code was rejected at checkout. {order_part}"], _reply_discount, 0.5),
}

FOLLOW_UPS = [
    ("Thanks! How long will that take?", "It usually takes 1 to 3 business days."
     " I'll email you as soon as it's done{ref}."),
    ("Great, can I also get an invoice for it?", "Of course, I've emailed the invoice{ref} to the address on your account."
     " Reply here if you need a company name on it."),
    ("And what if it still doesn't work out?", "Then reply to this email and I'll escalate it to a senior agent{ref}."
     " You'll hear back within one business day."),
]


def _ticket(intent: str, product: str, order: str | None, d: dict) -> str:
    templates, _, _ = INTENTS[intent]
    t = _R.choice(templates)
    order_part = _R.choice(["My order number is {o}.", "Order {o}.", "It's order {o}.", "Ref: {o}."]).format(o=order) if order else ""
    order_part_lc = f"order {order}" if order else "my order"
    text = t.format(product=product, order_part=order_part, order_part_lc=order_part_lc, days=d["days"], city=d["city"])
    text = f"{_R.choice(GREETINGS)} {text} {_R.choice(CLOSERS)}"
    return " ".join(text.split())


def generate(n: int = 1000, seed: int = 0) -> list[dict]:
    """Return about ``n`` raw rows (dicts with the CSV's columns), deterministic for a seed."""
    global _R
    _R = random.Random(seed)
    rows: list[dict] = []
    conv = 0
    while len(rows) < n:
        conv += 1
        cid = f"T{10000 + conv}"
        intent = _R.choice(list(INTENTS))
        _, reply_fn, p_order = INTENTS[intent]
        product = _R.choice(PRODUCTS)
        order = _order() if _R.random() < p_order else None
        d = {"days": _R.randint(2, 14), "city": _R.choice(CITIES), "carrier": _R.choice(CARRIERS)}
        channel = _R.choice(["email", "chat", "web form"])
        reply = f"{reply_fn(order, product, d)}\n{SIGN_OFF}"
        rows.append({"conversation_id": cid, "turn": 1, "channel": channel,
                     "ticket": _ticket(intent, product, order, d), "reply": reply})
        if _R.random() < 0.15 and len(rows) < n:
            q, a = _R.choice(FOLLOW_UPS)
            rows.append({"conversation_id": cid, "turn": 2, "channel": channel, "ticket": q,
                         "reply": a.format(ref=f" for order {order}" if order else "") + f"\n{SIGN_OFF}"})
    _add_export_dirt(rows)
    return rows


def _add_export_dirt(rows: list[dict]) -> None:
    """What real helpdesk exports contain: stray whitespace, duplicate rows, missing replies."""
    for i in _R.sample(range(len(rows)), k=max(1, len(rows) // 40)):
        rows[i]["ticket"] = "  " + rows[i]["ticket"].replace(" ", "  ", 1) + " \t"
    for i in sorted(_R.sample(range(len(rows)), k=max(1, len(rows) // 100)), reverse=True):
        rows.insert(i + 1, dict(rows[i]))  # the same exchange exported twice
    for i in _R.sample(range(len(rows)), k=max(1, len(rows) // 200)):
        rows[i]["reply"] = " "  # agent closed the ticket without a written reply


def write_csv(path: str | Path, n: int = 1000, seed: int = 0) -> Path:
    """Write the demo export to ``path`` (idempotent: same n and seed, same bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = generate(n, seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["conversation_id", "turn", "channel", "ticket", "reply"])
        w.writeheader()
        w.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------
# preference pairs: the house voice against realistic near-misses (``data.path: demo-preference``)

PADDING = ["I completely understand how frustrating this must be for you.",
           "We always aim to give our customers the best possible experience.",
           "Please don't hesitate to reach out if there is anything else at all.",
           "Thank you for your patience while we look into this for you."]
NEAR_MISSES = ("runs_long", "drops_order_number", "drops_sign_off")


def near_miss(reply: str, order: str | None, kind: str, rng: random.Random) -> str:
    """``reply`` (house voice, sign-off last) made wrong in one way a base model often is."""
    body = reply.rsplit("\n", 1)[0]
    if kind == "runs_long":  # past three sentences
        return f"{rng.choice(PADDING[:2])} {body} {' '.join(rng.sample(PADDING[2:], 2))}\n{SIGN_OFF}"
    if kind == "drops_order_number" and order:
        return f"{body.replace(f'order {order}', 'your order').replace(order, 'your order')}\n{SIGN_OFF}"
    return body  # drops the sign-off


def generate_preferences(n: int = 600, seed: int = 1) -> list[dict]:
    """About ``n`` OpenAI DPO records (``input.messages``, ``preferred_output``, ``non_preferred_output``):
    the preferred reply in the house voice, the other a near miss — longer than three sentences, the
    customer's order number dropped, or the sign-off missing (spread evenly; the order number only
    where there is one). Deterministic for a seed."""
    global _R
    _R = random.Random(seed)
    out = []
    while len(out) < n:
        intent = _R.choice(list(INTENTS))
        _, reply_fn, p_order = INTENTS[intent]
        product = _R.choice(PRODUCTS)
        order = _order() if _R.random() < p_order else None
        d = {"days": _R.randint(2, 14), "city": _R.choice(CITIES), "carrier": _R.choice(CARRIERS)}
        reply = f"{reply_fn(order, product, d)}\n{SIGN_OFF}"
        kinds = [k for k in NEAR_MISSES if k != "drops_order_number" or (order and order in reply)]
        kind = kinds[len(out) % len(kinds)]
        out.append({"input": {"messages": [{"role": "user", "content": _ticket(intent, product, order, d)}]},
                    "preferred_output": [{"role": "assistant", "content": reply}],
                    "non_preferred_output": [{"role": "assistant", "content": near_miss(reply, order, kind, _R)}],
                    "near_miss": kind})
    return out


def write_preferences(path: str | Path, n: int = 600, seed: int = 1) -> Path:
    """Write the demo preference pairs as OpenAI DPO JSONL (idempotent: same n and seed, same bytes)."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in generate_preferences(n, seed)),
                    encoding="utf-8")
    return path
