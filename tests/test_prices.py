import pytest

from proxy.prices import Price, PriceConfig, bundled_prices, lookup, price_of


def test_configured_price_wins_and_costs_usage():
    price = price_of(PriceConfig(input_usd_per_mtok=2, output_usd_per_mtok=8), "gpt-4o", {})
    assert price.cost({"prompt_tokens": 1000, "completion_tokens": 500}) == pytest.approx(0.006)
    assert price.cost(None) == 0


def test_bundled_price_list_with_and_without_provider_prefix():
    table = bundled_prices()
    if not table:
        pytest.skip("the litellm extra is not installed")
    plain = lookup("gpt-4o-mini", table)
    assert isinstance(plain, Price) and plain.input_per_token > 0
    assert lookup("openai/gpt-4o-mini", table) == plain
    assert lookup("no-such-model-anywhere", table) is None
