// CudaCopyEngine: CopyEngine on a CUDA stream (cudaMemcpyAsync with
// cudaMemcpyDefault, so either side may be device or host memory; one event
// per copy). Built only when nvcc is found (target te_transfer_cuda).
#pragma once

#include <memory>

#include "base/status.h"
#include "transfer/staging/copy_engine.h"

namespace te {

// Fails with kUnavailable, naming the CUDA error, where there is no device
// `device` (e.g. no GPU on this machine).
Result<std::unique_ptr<CopyEngine>> MakeCudaCopyEngine(int device);

}  // namespace te
