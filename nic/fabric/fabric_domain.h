// The libfabric implementation of nic::Domain.
#pragma once

#include <memory>

#include "base/status.h"
#include "nic/domain.h"
#include "nic/fabric/fabric_options.h"

namespace te::nic {

// Opens one RDM endpoint of `options.provider`. Errors name the provider and
// domain that were asked for.
Result<std::unique_ptr<Domain>> OpenFabricDomain(const FabricOptions& options);

}  // namespace te::nic
