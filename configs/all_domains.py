"""Train on all seven tumour types (the paper's last row of Tables 4-7)."""

from configs import default


def get_config():
  return default.get_config()
