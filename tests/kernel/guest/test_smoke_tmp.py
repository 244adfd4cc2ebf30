import os
def test_smoke():
    assert os.path.exists("/dev/vfio/vfio"), os.listdir("/dev")
