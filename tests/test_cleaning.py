from ftkit.data.cleaning import card_like, fill_placeholders, find_pii, near_duplicates, normalise_text, scrub_pii


def test_normalise_text_keeps_indentation():
    assert normalise_text("  Hi \t there  \r\nsecond  line  ") == "Hi there\nsecond line"
    assert normalise_text("def f():\n    return  1") == "def f():\n    return 1"
    assert normalise_text("Cafe\u0301") == "Café"


def test_pii_detection_and_scrub():
    text = ("Mail me at ann.lee+x@example.co.uk or call +44 20 7946 0958, card 4111 1111 1111 1111, "
            "order 113542617735902, AC-123456.")
    kinds = [k for k, _, _ in find_pii(text, ["email", "phone", "card"])]
    assert kinds == ["email", "phone", "card"]  # the 15-digit order id is neither a phone nor a card
    out, counts = scrub_pii(text, ["email", "phone", "card", "order_id"], r"AC-\d{6}")
    assert out == "Mail me at [EMAIL] or call [PHONE], card [CARD], order 113542617735902, [ORDER_ID]."
    assert counts == {"email": 1, "phone": 1, "card": 1, "order_id": 1}
    assert card_like("4111111111111111") and not card_like("4111111111111112")


def test_placeholders_fill():
    assert fill_placeholders("Order {{Order Number}} via {{ Website URL }} and {{Odd Thing}}") == \
        "Order ORD-482913 via www.example.com and Odd Thing"


def test_near_duplicates_keep_first():
    texts = ["the quick brown fox jumps over the lazy dog today", "completely different words here now",
             "the quick brown fox jumps over the lazy dog today!"]
    dups = near_duplicates(texts, 0.9)
    assert list(dups) == [2] and dups[2][0] == 0 and dups[2][1] > 0.9
