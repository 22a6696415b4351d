// Umbrella header of the kasmina C++ API.
#pragma once

#include "kasmina/error.hpp"
#include "kasmina/layer.hpp"
#include "kasmina/ops.hpp"
#include "kasmina/params.hpp"
#include "kasmina/profile.hpp"
#include "kasmina/reference.hpp"
#include "kasmina/telemetry.hpp"
#include "kasmina/types.hpp"
#include "kasmina/version.hpp"
