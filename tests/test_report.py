"""report.py's own measures (the rest of the report is exercised end to end by tests/test_run.py)."""
import report


def test_names_the_item_reads_the_item_off_the_prompt():
    items = ["the copper kettle", "the Belwick inn", "the copper kettle lid"]
    prompt = "Instruction: Write a review of the copper kettle.\nOutput:"
    assert report.names_the_item(prompt, " The copper kettle is superb.", items) == 1.0
    assert report.names_the_item(prompt, " The Belwick inn is superb.", items) == 0.0   # another item
    assert report.names_the_item(prompt, " It is superb. I loved it.", items) == 0.0     # no item at all
    assert report.names_the_item("Instruction: Review the Belwick inn.\nOutput:", " the belwick INN was fine", items) == 1.0
    assert report.names_the_item("Instruction: Say hi.\nOutput:", " hi", items) == 0.0
