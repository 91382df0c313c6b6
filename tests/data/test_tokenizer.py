"""data/tokenizer.py: the byte tokenizer."""

from flashmoba.data import ByteTokenizer

tokenizer = ByteTokenizer()


def test_byte_tokenizer_round_trip():
    text = "MoBA: Σ blocks → top-k ✓\n"
    ids = tokenizer.encode(text, bos=True)
    assert ids[0] == tokenizer.bos_id and max(ids[1:]) < 256
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_array(text).tolist() == ids[1:]
