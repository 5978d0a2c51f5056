// transfer_engine._transfer_engine: the compiled half of the Python package.
// The package's __init__.py re-exports it and adds asyncio on top.
#include <pybind11/pybind11.h>

#include "py_engine.h"
#include "py_kvcache.h"
#include "py_moe.h"
#include "py_placement.h"
#include "py_weightsync.h"
#include "status_error.h"

PYBIND11_MODULE(_transfer_engine, m) {
  m.doc() = "RDMA point-to-point transfer engine: WriteImm + ImmCounter over libfabric and verbs.";
  tepy::RegisterStatusError(m);
  tepy::BindEngine(m);
  tepy::BindKvCache(m);
  tepy::BindWeightSync(m);
  tepy::BindMoe(m);
  tepy::BindPlacement(m);
}
