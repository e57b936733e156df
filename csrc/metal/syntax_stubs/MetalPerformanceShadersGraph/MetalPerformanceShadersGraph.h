// Syntax-check stub (see ../README.md): types ATen/mps/MPSStream.h names.
#pragma once
#import <MetalPerformanceShaders/MetalPerformanceShaders.h>
@interface MPSGraph : NSObject
@end
@interface MPSGraphExecutionDescriptor : NSObject
@end
@interface MPSGraphCompilationDescriptor : NSObject
@end
