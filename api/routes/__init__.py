"""Route modules, each an ``APIRouter``: thin handlers that parse, call one service, shape the answer."""
