import os
import signal
import time

import pytest

from jaxtl.interrupt import Interrupted, StopRequests


def wait_for_handler():
    time.sleep(0.2)  # a signal's Python handler runs at the next bytecode of the main thread


def test_during_the_epochs_a_first_signal_is_recorded_and_a_second_ctrl_c_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    with StopRequests() as stops:
        stops.deferred = True
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for_handler()
        assert stops.signal() == signal.SIGTERM  # recorded for the next step boundary; nothing raised
        with pytest.raises(Interrupted, match="interrupted again: stopped without saving") as e:
            os.kill(os.getpid(), signal.SIGINT)
            wait_for_handler()
        assert e.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before  # the handlers it replaced are back


def test_outside_the_epochs_a_signal_stops_at_once_with_the_runs_message():
    with StopRequests() as stops:
        stops.outside = ("interrupted before training began", None)
        with pytest.raises(Interrupted, match="^interrupted before training began$") as e:
            os.kill(os.getpid(), signal.SIGTERM)
            wait_for_handler()
    assert e.value.exit_code == 143 and stops.received == 0


def test_a_stop_in_an_ensembles_member_is_continued_as_the_ensemble():
    member = Interrupted(signal.SIGTERM, "interrupted at stage 1 epoch 2 (step 6)", "RUN/members/1")
    assert str(member.of_run("RUN")) == ("interrupted at stage 1 epoch 2 (step 6); continue with: jaxtl train --out "
                                         "RUN --resume") and member.of_run("RUN").exit_code == 143
